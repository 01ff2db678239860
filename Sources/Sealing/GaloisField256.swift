/// Arithmetic in GF(2^8) with the AES reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11B), the
/// field Shamir's secret sharing runs in here.
///
/// Every operation is constant-time: no table lookup indexed by a secret byte and no branch on
/// one, because the bytes multiplied are PIN bytes and polynomial coefficients (a log/exp table
/// would leak them through the cache).
package enum GaloisField256 {
    /// Addition and subtraction are the same operation: exclusive or.
    @inline(__always)
    package static func add(_ a: UInt8, _ b: UInt8) -> UInt8 { a ^ b }

    /// The product of `a` and `b`, by shift-and-add with the reduction masked in.
    package static func multiply(_ a: UInt8, _ b: UInt8) -> UInt8 {
        var a = a
        var b = b
        var product: UInt8 = 0
        for _ in 0..<8 {
            // All ones when the low bit of b is set, else zero.
            product ^= a & (0 &- (b & 1))
            let carry = 0 &- (a >> 7)
            a = (a << 1) ^ (0x1B & carry)
            b >>= 1
        }
        return product
    }

    /// The multiplicative inverse, a^254 (a^255 = 1 for every non-zero a). Zero maps to zero;
    /// callers never divide by zero because share x coordinates are distinct and non-zero.
    package static func inverse(_ a: UInt8) -> UInt8 {
        // 254 = 0b11111110: square-and-multiply with a fixed exponent, the same steps for every a.
        var result: UInt8 = 1
        var power = a
        for bit in 0..<8 {
            if (254 >> bit) & 1 == 1 {
                result = multiply(result, power)
            }
            power = multiply(power, power)
        }
        return result
    }

    /// a / b; `b` must not be zero.
    package static func divide(_ a: UInt8, _ b: UInt8) -> UInt8 {
        multiply(a, inverse(b))
    }
}
