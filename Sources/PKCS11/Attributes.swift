internal import CPKCS11Shim

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// An attribute type (`CK_ATTRIBUTE_TYPE`); the ones the gateway reads or sets have names.
public struct AttributeType: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }

    public static let objectClass = AttributeType(rawValue: UInt(CKA_CLASS))
    public static let token = AttributeType(rawValue: UInt(CKA_TOKEN))
    public static let `private` = AttributeType(rawValue: UInt(CKA_PRIVATE))
    public static let label = AttributeType(rawValue: UInt(CKA_LABEL))
    public static let value = AttributeType(rawValue: UInt(CKA_VALUE))
    public static let keyType = AttributeType(rawValue: UInt(CKA_KEY_TYPE))
    public static let id = AttributeType(rawValue: UInt(CKA_ID))
    public static let sensitive = AttributeType(rawValue: UInt(CKA_SENSITIVE))
    public static let encrypt = AttributeType(rawValue: UInt(CKA_ENCRYPT))
    public static let decrypt = AttributeType(rawValue: UInt(CKA_DECRYPT))
    public static let wrap = AttributeType(rawValue: UInt(CKA_WRAP))
    public static let unwrap = AttributeType(rawValue: UInt(CKA_UNWRAP))
    public static let sign = AttributeType(rawValue: UInt(CKA_SIGN))
    public static let verify = AttributeType(rawValue: UInt(CKA_VERIFY))
    public static let derive = AttributeType(rawValue: UInt(CKA_DERIVE))
    public static let valueLength = AttributeType(rawValue: UInt(CKA_VALUE_LEN))
    public static let extractable = AttributeType(rawValue: UInt(CKA_EXTRACTABLE))
    public static let local = AttributeType(rawValue: UInt(CKA_LOCAL))
    public static let neverExtractable = AttributeType(rawValue: UInt(CKA_NEVER_EXTRACTABLE))
    public static let alwaysSensitive = AttributeType(rawValue: UInt(CKA_ALWAYS_SENSITIVE))
    public static let keyGenMechanism = AttributeType(rawValue: UInt(CKA_KEY_GEN_MECHANISM))
    public static let modifiable = AttributeType(rawValue: UInt(CKA_MODIFIABLE))
    public static let copyable = AttributeType(rawValue: UInt(CKA_COPYABLE))
    public static let destroyable = AttributeType(rawValue: UInt(CKA_DESTROYABLE))
    public static let wrapWithTrusted = AttributeType(rawValue: UInt(CKA_WRAP_WITH_TRUSTED))
    public static let trusted = AttributeType(rawValue: UInt(CKA_TRUSTED))

    static let names: [UInt: String] = [
        UInt(CKA_CLASS): "CKA_CLASS", UInt(CKA_TOKEN): "CKA_TOKEN", UInt(CKA_PRIVATE): "CKA_PRIVATE",
        UInt(CKA_LABEL): "CKA_LABEL", UInt(CKA_VALUE): "CKA_VALUE", UInt(CKA_KEY_TYPE): "CKA_KEY_TYPE",
        UInt(CKA_ID): "CKA_ID", UInt(CKA_SENSITIVE): "CKA_SENSITIVE", UInt(CKA_ENCRYPT): "CKA_ENCRYPT",
        UInt(CKA_DECRYPT): "CKA_DECRYPT", UInt(CKA_WRAP): "CKA_WRAP", UInt(CKA_UNWRAP): "CKA_UNWRAP",
        UInt(CKA_SIGN): "CKA_SIGN", UInt(CKA_VERIFY): "CKA_VERIFY", UInt(CKA_DERIVE): "CKA_DERIVE",
        UInt(CKA_VALUE_LEN): "CKA_VALUE_LEN", UInt(CKA_EXTRACTABLE): "CKA_EXTRACTABLE",
        UInt(CKA_LOCAL): "CKA_LOCAL", UInt(CKA_NEVER_EXTRACTABLE): "CKA_NEVER_EXTRACTABLE",
        UInt(CKA_ALWAYS_SENSITIVE): "CKA_ALWAYS_SENSITIVE", UInt(CKA_KEY_GEN_MECHANISM): "CKA_KEY_GEN_MECHANISM",
        UInt(CKA_MODIFIABLE): "CKA_MODIFIABLE", UInt(CKA_COPYABLE): "CKA_COPYABLE",
        UInt(CKA_DESTROYABLE): "CKA_DESTROYABLE", UInt(CKA_WRAP_WITH_TRUSTED): "CKA_WRAP_WITH_TRUSTED",
        UInt(CKA_TRUSTED): "CKA_TRUSTED",
    ]

    public var description: String { Self.names[rawValue] ?? "CKA_0x" + String(rawValue, radix: 16) }
}

/// An object class (`CKO_…`).
public struct ObjectClass: Hashable, Sendable {
    public let rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    public static let data = ObjectClass(rawValue: UInt(CKO_DATA))
    public static let secretKey = ObjectClass(rawValue: UInt(CKO_SECRET_KEY))
    public static let publicKey = ObjectClass(rawValue: UInt(CKO_PUBLIC_KEY))
    public static let privateKey = ObjectClass(rawValue: UInt(CKO_PRIVATE_KEY))
}

/// A key type (`CKK_…`).
public struct KeyType: Hashable, Sendable {
    public let rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    public static let aes = KeyType(rawValue: UInt(CKK_AES))
    public static let genericSecret = KeyType(rawValue: UInt(CKK_GENERIC_SECRET))
}

/// One entry of an attribute template, typed by what PKCS#11 stores for it.
public enum Attribute: Sendable {
    case objectClass(ObjectClass)
    case keyType(KeyType)
    case token(Bool)
    case `private`(Bool)
    case sensitive(Bool)
    case extractable(Bool)
    case modifiable(Bool)
    case copyable(Bool)
    case destroyable(Bool)
    case encrypt(Bool)
    case decrypt(Bool)
    case wrap(Bool)
    case unwrap(Bool)
    case sign(Bool)
    case verify(Bool)
    case derive(Bool)
    case label(String)
    case id([UInt8])
    /// Key length in bytes (`CKA_VALUE_LEN`).
    case valueLength(Int)
    /// Key material (`CKA_VALUE`), for importing known keys (test vectors).
    case value(SecretBytes)

    /// The attribute type this entry sets.
    public var type: AttributeType {
        switch self {
        case .objectClass: .objectClass
        case .keyType: .keyType
        case .token: .token
        case .private: .private
        case .sensitive: .sensitive
        case .extractable: .extractable
        case .modifiable: .modifiable
        case .copyable: .copyable
        case .destroyable: .destroyable
        case .encrypt: .encrypt
        case .decrypt: .decrypt
        case .wrap: .wrap
        case .unwrap: .unwrap
        case .sign: .sign
        case .verify: .verify
        case .derive: .derive
        case .label: .label
        case .id: .id
        case .valueLength: .valueLength
        case .value: .value
        }
    }

    fileprivate var encodedLength: Int {
        switch self {
        case .objectClass, .keyType, .valueLength: MemoryLayout<CK_ULONG>.size
        case .label(let text): text.utf8.count
        case .id(let bytes): bytes.count
        case .value(let secret): secret.count
        default: MemoryLayout<CK_BBOOL>.size
        }
    }

    fileprivate func encode(into buffer: UnsafeMutableRawBufferPointer) {
        func store(_ value: CK_ULONG) {
            buffer.storeBytes(of: value, as: CK_ULONG.self)
        }
        func store(_ flag: Bool) {
            buffer.storeBytes(of: CK_BBOOL(flag ? CK_TRUE : CK_FALSE), as: CK_BBOOL.self)
        }
        switch self {
        case .objectClass(let value): store(value.rawValue)
        case .keyType(let value): store(value.rawValue)
        case .valueLength(let value): store(CK_ULONG(value))
        case .label(let text): buffer.copyBytes(from: text.utf8)
        case .id(let bytes): buffer.copyBytes(from: bytes)
        case .value(let secret): secret.withUnsafeBytes { buffer.copyMemory(from: $0) }
        case .token(let flag), .private(let flag), .sensitive(let flag), .extractable(let flag),
            .modifiable(let flag), .copyable(let flag), .destroyable(let flag), .encrypt(let flag),
            .decrypt(let flag), .wrap(let flag), .unwrap(let flag), .sign(let flag), .verify(let flag),
            .derive(let flag):
            store(flag)
        }
    }
}

/// Lays a template out as a `CK_ATTRIBUTE` array over one buffer for the duration of `body`, then
/// zeroes the buffer (a template may carry key material).
func withAttributeTemplate<R>(
    _ template: [Attribute],
    _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) throws -> R
) rethrows -> R {
    let alignment = MemoryLayout<CK_ULONG>.alignment
    var total = 0
    var starts: [Int] = []
    starts.reserveCapacity(template.count)
    for attribute in template {
        starts.append(total)
        total += (attribute.encodedLength + alignment - 1) / alignment * alignment
    }
    let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: alignment)
    let attributes = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: max(template.count, 1))
    defer {
        explicit_bzero(storage.baseAddress!, storage.count)
        storage.deallocate()
        attributes.deallocate()
    }
    for (index, attribute) in template.enumerated() {
        let length = attribute.encodedLength
        let slice = UnsafeMutableRawBufferPointer(rebasing: storage[starts[index]..<(starts[index] + length)])
        attribute.encode(into: slice)
        (attributes + index).initialize(
            to: CK_ATTRIBUTE(type: attribute.type.rawValue, pValue: slice.baseAddress, ulValueLen: CK_ULONG(length))
        )
    }
    return try body(template.isEmpty ? nil : attributes, CK_ULONG(template.count))
}

/// The outcome of reading one attribute.
public enum AttributeValue: Hashable, Sendable {
    /// The attribute's bytes.
    case bytes([UInt8])
    /// The object is sensitive or unextractable, so the token will not reveal it
    /// (`CKR_ATTRIBUTE_SENSITIVE`).
    case sensitive
    /// The object has no such attribute (`CKR_ATTRIBUTE_TYPE_INVALID`).
    case typeInvalid
}

/// Attributes read from one object.
public struct AttributeValues: Sendable {
    /// Every requested attribute with what the token said about it.
    public let values: [AttributeType: AttributeValue]

    /// Wraps values read from a token (or built by hand, to test a policy).
    public init(values: [AttributeType: AttributeValue]) {
        self.values = values
    }

    public subscript(_ type: AttributeType) -> AttributeValue? { values[type] }

    /// The boolean value; nil when absent, sensitive or not one byte.
    public func bool(_ type: AttributeType) -> Bool? {
        guard case .bytes(let bytes) = values[type], bytes.count == MemoryLayout<CK_BBOOL>.size else { return nil }
        return bytes[0] != 0
    }

    /// The `CK_ULONG` value; nil when absent, sensitive or the wrong size.
    public func unsignedInteger(_ type: AttributeType) -> UInt? {
        guard case .bytes(let bytes) = values[type], bytes.count == MemoryLayout<CK_ULONG>.size else { return nil }
        return bytes.withUnsafeBytes { $0.loadUnaligned(as: CK_ULONG.self) }
    }

    /// The raw bytes; nil when absent or sensitive.
    public func bytes(_ type: AttributeType) -> [UInt8]? {
        guard case .bytes(let bytes) = values[type] else { return nil }
        return bytes
    }

    /// The value as UTF-8 text (labels).
    public func string(_ type: AttributeType) -> String? {
        bytes(type).map { String(decoding: $0, as: UTF8.self) }
    }
}
