internal import CPKCS11Shim

/// What the gateway knows of NSS's softoken (`libsoftokn3.so`), the second PKCS#11
/// implementation its tests run against (docs/hsm/nss-softoken.md).
///
/// The softoken keeps one token per key database (an SQLite `key4.db` in a directory). It reads
/// the directory and the token's label from its library parameters, given to `C_Initialize` in
/// `CK_C_INITIALIZE_ARGS.pReserved` (`hsm.initialize_args`); the label is not stored in the
/// database. Slot 1 is NSS's "Generic Crypto Services" (no storage), slot 2 the database's token.
public enum NSSSoftoken {
    /// Debian's path of the module (package `libnss3`).
    public static let defaultModulePath = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"

    /// The softoken's "Generic Crypto Services" slot (NSS's `NETSCAPE_SLOT_ID`): no token
    /// objects, but the slot through which further databases are opened.
    static let cryptoSlotID: CK_SLOT_ID = 1
    /// The first slot id NSS accepts for a database opened at run time (`SFTK_MIN_USER_SLOT_ID`).
    public static let firstUserSlotID: UInt = 4
    /// The last one (`SFTK_MAX_USER_SLOT_ID`).
    public static let lastUserSlotID: UInt = 100

    /// NSS's vendor-defined object class and attribute (`pkcs11n.h`): `CKO_NSS_NEWSLOT` and
    /// `CKA_NSS_MODULE_SPEC`, both `CKA_VENDOR_DEFINED | 0x4E534350` plus an offset.
    static let vendorBase: CK_ULONG = 0x8000_0000 | 0x4E53_4350
    static let newSlotClass: CK_OBJECT_CLASS = vendorBase + 5
    static let moduleSpecAttribute: CK_ATTRIBUTE_TYPE = vendorBase + 24

    /// The library parameters for a database in `directory` whose token is labelled
    /// `tokenLabel`: what `hsm.initialize_args` holds for this module.
    ///
    /// - Throws: `invalidArgument` when the directory or label holds a character NSS's parameter
    ///   syntax gives a meaning to (quotes, brackets, NUL), or the label is over 32 bytes.
    public static func initializeArguments(databaseDirectory directory: String, tokenLabel: String) throws -> String {
        try checkParameter(directory, what: "database directory")
        try checkParameter(tokenLabel, what: "token label")
        guard tokenLabel.utf8.count <= 32 else {
            throw PKCS11Error(code: .invalidArgument, detail: "a token label is at most 32 bytes")
        }
        return "configdir='sql:\(directory)' certPrefix='' keyPrefix='' secmod='secmod.db' flags= "
            + "dbTokenDescription='\(tokenLabel)'"
    }

    /// Refuses what would end or nest a quoted NSS parameter.
    static func checkParameter(_ value: String, what: String) throws {
        let forbidden: Set<UInt8> = [
            0, UInt8(ascii: "'"), UInt8(ascii: "\""), UInt8(ascii: "<"), UInt8(ascii: ">"),
            UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "\\"),
        ]
        guard !value.isEmpty, !value.utf8.contains(where: forbidden.contains) else {
            throw PKCS11Error(code: .invalidArgument, detail: "the \(what) is empty or holds a quote, bracket or NUL")
        }
    }
}

extension PKCS11Module {
    /// NSS's softoken only: opens the key database in `directory` (created when empty) as a new
    /// slot of this already initialised module, its token labelled `tokenLabel`, and returns the
    /// slot. This is what NSS's `SECMOD_OpenUserDB` does: `C_CreateObject` of a `CKO_NSS_NEWSLOT`
    /// object on the Generic Crypto Services slot. The test fixture uses it to give every suite
    /// a fresh token in one process, as SoftHSM2's free slot does.
    ///
    /// A new database has no password: the token reports itself uninitialised until the user PIN
    /// is set, by logging in as security officer with an empty PIN and calling `C_InitPIN`.
    ///
    /// - Throws: `invalidArgument` for a directory or label NSS's syntax cannot carry, or when
    ///   every user slot id is taken; `functionFailed` from `C_OpenSession` or `C_CreateObject`
    ///   (any module but NSS's softoken refuses the object class).
    public func openNSSDatabaseSlot(directory: String, tokenLabel: String) throws -> SlotID {
        try NSSSoftoken.checkParameter(directory, what: "database directory")
        try NSSSoftoken.checkParameter(tokenLabel, what: "token label")
        let taken = Set(try slotIDs(tokenPresent: false).map(\.rawValue))
        guard
            let slotID = (NSSSoftoken.firstUserSlotID...NSSSoftoken.lastUserSlotID).first(where: {
                !taken.contains($0)
            })
        else {
            throw PKCS11Error(
                code: .invalidArgument,
                detail:
                    "every NSS user slot id (\(NSSSoftoken.firstUserSlotID)-\(NSSSoftoken.lastUserSlotID)) is taken: "
                    + "NSS opens at most \(NSSSoftoken.lastUserSlotID - NSSSoftoken.firstUserSlotID + 1) databases per process"
            )
        }
        // NSS's module-spec syntax: the token's own parameters inside `tokens=[ID=<…>]`.
        let spec =
            "tokens=[0x\(String(slotID, radix: 16))=<configdir='sql:\(directory)' tokenDescription='\(tokenLabel)'>]"
        let cryptoSlot = SlotID(rawValue: NSSSoftoken.cryptoSlotID)
        let session = try openSessionHandle(slot: cryptoSlot, readWrite: true)
        defer { _ = try? closeSessionHandle(session, slot: cryptoSlot) }
        var objectClass = NSSSoftoken.newSlotClass
        var specBytes = Array(spec.utf8)
        try withUnsafeMutableBytes(of: &objectClass) { classBytes in
            try specBytes.withUnsafeMutableBytes { specBuffer in
                var template = [
                    CK_ATTRIBUTE(
                        type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: classBytes.baseAddress,
                        ulValueLen: CK_ULONG(classBytes.count)),
                    CK_ATTRIBUTE(
                        type: NSSSoftoken.moduleSpecAttribute, pValue: specBuffer.baseAddress,
                        ulValueLen: CK_ULONG(specBuffer.count)),
                ]
                var object = CK_OBJECT_HANDLE(0)
                try call(.createObject, \.C_CreateObject) {
                    $0(session, &template, CK_ULONG(template.count), &object)
                }
            }
        }
        return SlotID(rawValue: CK_SLOT_ID(slotID))
    }
}
