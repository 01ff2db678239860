import Testing

@testable import Sealing

@Suite("GF(256) arithmetic over the AES polynomial 0x11B")
struct GaloisField256Tests {
    // FIPS-197 section 4.2 works these products by hand.
    @Test(
        "FIPS-197 worked examples",
        arguments: [
            (UInt8(0x57), UInt8(0x83), UInt8(0xC1)),
            (0x57, 0x13, 0xFE),
            (0x57, 0x02, 0xAE),
            (0x57, 0x04, 0x47),
            (0x57, 0x08, 0x8E),
            (0x57, 0x10, 0x07),
            (0x00, 0xFF, 0x00),
            (0x01, 0xAB, 0xAB),
        ]
    )
    func fipsExamples(a: UInt8, b: UInt8, product: UInt8) {
        #expect(GaloisField256.multiply(a, b) == product)
        #expect(GaloisField256.multiply(b, a) == product)
    }

    // The AES S-box is built from these inverses (FIPS-197 5.1.1; {53}^-1 = {CA} is the example
    // every textbook repeats).
    @Test("Known inverses", arguments: [(UInt8(0x53), UInt8(0xCA)), (0x01, 0x01), (0x02, 0x8D), (0x03, 0xF6)])
    func knownInverses(a: UInt8, inverse: UInt8) {
        #expect(GaloisField256.inverse(a) == inverse)
        #expect(GaloisField256.inverse(inverse) == a)
    }

    @Test("Zero has no inverse and maps to zero")
    func zeroInverse() {
        #expect(GaloisField256.inverse(0) == 0)
    }

    /// Log and antilog tables built independently of the code under test: 0x03 generates the
    /// multiplicative group, and multiplying by 3 is "xtime(a) xor a" with the 0x11B reduction.
    static let tables: (exp: [UInt8], log: [Int]) = {
        var exp = [UInt8](repeating: 0, count: 255)
        var log = [Int](repeating: -1, count: 256)
        var value: UInt8 = 1
        for power in 0..<255 {
            exp[power] = value
            log[Int(value)] = power
            let doubled = (value << 1) ^ ((value & 0x80) != 0 ? 0x1B : 0)
            value = doubled ^ value
        }
        return (exp, log)
    }()

    @Test("0x03 generates all 255 non-zero elements")
    func generator() {
        #expect(Set(Self.tables.exp).count == 255)
        #expect(!Self.tables.exp.contains(0))
    }

    @Test("Every product matches the log/antilog tables (all 65,536 pairs)")
    func fullMultiplicationTable() {
        let (exp, log) = Self.tables
        var mismatches = 0
        for a in 0...255 {
            for b in 0...255 {
                let expected: UInt8 = (a == 0 || b == 0) ? 0 : exp[(log[a] + log[b]) % 255]
                if GaloisField256.multiply(UInt8(a), UInt8(b)) != expected { mismatches += 1 }
            }
        }
        #expect(mismatches == 0)
    }

    @Test("Every non-zero element's inverse matches the tables, and a · a⁻¹ = 1")
    func fullInverseTable() {
        let (exp, log) = Self.tables
        for a in 1...255 {
            let inverse = GaloisField256.inverse(UInt8(a))
            #expect(inverse == exp[(255 - log[a]) % 255])
            #expect(GaloisField256.multiply(UInt8(a), inverse) == 1)
        }
    }
}
