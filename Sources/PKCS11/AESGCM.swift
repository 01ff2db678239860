internal import CPKCS11Shim

/// AES-GCM through the token (`CKM_AES_GCM`), with a 96-bit IV and a 128-bit tag.
extension Session {
    /// IV length: 96 bits, the length NIST SP 800-38D recommends for random IVs.
    public static let gcmIVByteCount = 12
    /// Tag length: 128 bits, the full GCM tag.
    public static let gcmTagByteCount = 16
    /// The largest AAD accepted: far above any encryption context the gateway builds, and a
    /// bound on what one call can make the token process.
    public static let maximumGCMAADByteCount = 64 * 1024
    /// The largest plaintext accepted in one call (1 MiB); the gateway's own payload limit is lower.
    public static let maximumGCMPlaintextByteCount = 1 << 20

    /// Encrypts `plaintext` under `key` with `iv` and `aad`; returns ciphertext followed by the tag.
    ///
    /// The IV must never repeat under one key: use `sealAESGCM`, which draws it from the token's
    /// RNG, unless the caller keeps its own IV discipline.
    public func encryptAESGCM(
        key: ObjectHandle,
        iv: [UInt8],
        aad: [UInt8],
        plaintext: UnsafeRawBufferPointer
    ) throws -> [UInt8] {
        try checkGCMArguments(function: .encryptInit, iv: iv, aad: aad, inputCount: plaintext.count)
        let outputCount = plaintext.count + Session.gcmTagByteCount
        return try withGCMMechanism(iv: iv, aad: aad) { mechanism in
            // The parameters stay alive from C_EncryptInit through C_Encrypt.
            try call(.encryptInit, \.C_EncryptInit) { $0(handle, mechanism, key.rawValue) }
            let input = UnsafeMutablePointer(mutating: plaintext.baseAddress?.assumingMemoryBound(to: CK_BYTE.self))
            // From here on an operation is active. Only success ends it for sure: any failure
            // (CKR_BUFFER_TOO_SMALL keeps it active by definition) leaves the session unusable.
            do {
                return try [UInt8](unsafeUninitializedCapacity: outputCount) { output, initialized in
                    var written = CK_ULONG(outputCount)
                    try call(.encrypt, \.C_Encrypt) {
                        $0(handle, input, CK_ULONG(plaintext.count), output.baseAddress, &written)
                    }
                    let count = try checkReported(.encrypt, written, capacity: outputCount)
                    // GCM output is exactly plaintext plus tag: less would be a truncated ciphertext
                    // that never decrypts again.
                    guard count == outputCount else {
                        throw misbehaved(.encrypt, "reported \(count) bytes of GCM output, expected \(outputCount)")
                    }
                    initialized = count
                }
            } catch let error as PKCS11Error {
                throw unusable(error)
            }
        }
    }

    /// Encrypts bytes held in an array.
    public func encryptAESGCM(key: ObjectHandle, iv: [UInt8], aad: [UInt8], plaintext: [UInt8]) throws -> [UInt8] {
        try plaintext.withUnsafeBytes { try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: $0) }
    }

    /// Encrypts secret bytes (key material).
    public func encryptAESGCM(key: ObjectHandle, iv: [UInt8], aad: [UInt8], plaintext: SecretBytes) throws -> [UInt8] {
        try plaintext.withUnsafeBytes { try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: $0) }
    }

    /// Decrypts ciphertext-and-tag under `key`; any change to ciphertext, tag, IV or AAD fails
    /// (`C_Decrypt` returns an error; SoftHSM2 says `CKR_GENERAL_ERROR`, others
    /// `CKR_ENCRYPTED_DATA_INVALID` or `CKR_AEAD_DECRYPT_FAILED`). No plaintext is returned on
    /// failure. The plaintext comes back in zeroed-on-release memory.
    public func decryptAESGCM(
        key: ObjectHandle,
        iv: [UInt8],
        aad: [UInt8],
        ciphertextAndTag: [UInt8]
    ) throws -> SecretBytes {
        try checkGCMArguments(
            function: .decryptInit,
            iv: iv,
            aad: aad,
            inputCount: ciphertextAndTag.count - Session.gcmTagByteCount
        )
        return try withGCMMechanism(iv: iv, aad: aad) { mechanism in
            try call(.decryptInit, \.C_DecryptInit) { $0(handle, mechanism, key.rawValue) }
            let expected = ciphertextAndTag.count - Session.gcmTagByteCount
            // From here on an operation is active. A ciphertext that does not authenticate ends
            // it (those codes say so); any other failure leaves the session unusable.
            do {
                return try ciphertextAndTag.withUnsafeBufferPointer { input in
                    // C_Decrypt's input pointer is not const in the C API but is only read.
                    let inputPointer = UnsafeMutablePointer(mutating: input.baseAddress)
                    // Some modules want room for the whole input before they know the tag checks out.
                    return try SecretBytes(capacity: input.count) { buffer in
                        var written = CK_ULONG(buffer.count)
                        let output = buffer.baseAddress!.assumingMemoryBound(to: CK_BYTE.self)
                        try call(.decrypt, \.C_Decrypt) {
                            $0(handle, inputPointer, CK_ULONG(input.count), output, &written)
                        }
                        let count = try checkReported(.decrypt, written, capacity: buffer.count)
                        guard count == expected else {
                            throw misbehaved(.decrypt, "reported \(count) bytes of GCM plaintext, expected \(expected)")
                        }
                        return count
                    }
                }
            } catch let error as PKCS11Error where !error.isDecryptAuthenticationFailure {
                throw unusable(error)
            }
        }
    }

    /// A GCM encryption with a fresh IV from the token's RNG.
    public func sealAESGCM(key: ObjectHandle, aad: [UInt8], plaintext: UnsafeRawBufferPointer) throws -> AESGCMSealedBox
    {
        let iv = try generateRandom(count: Session.gcmIVByteCount)
        let sealed = try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: plaintext)
        return AESGCMSealedBox(iv: iv, ciphertextAndTag: sealed)
    }

    /// Opens a sealed box made by `sealAESGCM` (or any AES-GCM with a 96-bit IV and 128-bit tag).
    public func openAESGCM(key: ObjectHandle, aad: [UInt8], box: AESGCMSealedBox) throws -> SecretBytes {
        try decryptAESGCM(key: key, iv: box.iv, aad: aad, ciphertextAndTag: box.ciphertextAndTag)
    }

    // MARK: IVs generated by the module (`hsm.gcm_iv: token`)

    /// The longest IV a module appends to its GCM output that `sealAESGCMWithTokenIV` makes room
    /// for: Thales Luna before firmware 7.9.3 generates 16-byte IVs in FIPS mode. Such an IV is
    /// recognised and refused (the gateway's formats carry 96-bit IVs), never truncated.
    public static let maximumAppendedGCMIVByteCount = 16

    /// A GCM encryption whose 96-bit IV the module generates itself, as HSMs in FIPS mode require
    /// (they refuse an IV chosen by the caller, `CKR_MECHANISM_PARAM_INVALID`). The sealed box has
    /// the same shape as `sealAESGCM`'s, and opens with `openAESGCM` (plain `C_Decrypt` with the
    /// stored IV), so nothing stored changes.
    ///
    /// Two documented vendor forms; the one this module accepted last is tried first, the other
    /// when `C_EncryptInit` refuses it with `CKR_MECHANISM_PARAM_INVALID`:
    /// 1. AWS CloudHSM: `pIv` points to a zeroed 12-byte buffer (`ulIvLen` 12, `ulIvBits` 96);
    ///    the HSM ignores its contents and writes the IV it generated into it ("the HSM writes the
    ///    generated IV to the memory reference pointed to by the pIV element of the
    ///    CK_GCM_PARAMS", docs.aws.amazon.com/cloudhsm/latest/userguide/pkcs11-mechanisms.html).
    /// 2. Thales Luna in FIPS mode (HSM policy 12 off), firmware 7.9.3 and later: `ulIvLen` 0 with
    ///    `ulIvBits` 96 asks for a generated 96-bit IV, which comes back after the tag at the end
    ///    of the output (thalesdocs.com/gphsm/luna/7/docs/network/Content/sdk/mechanisms/
    ///    CKM_AES_GCM.htm).
    ///
    /// The output buffer has room for an appended IV of up to
    /// `maximumAppendedGCMIVByteCount` bytes; the returned length says which form the module used.
    ///
    /// - Throws: `ivNotGenerated` when the module left the zeroed buffer as it was (it takes caller
    ///   IVs and would have used an all-zero IV: that ciphertext is discarded; use
    ///   `hsm.gcm_iv: gateway`) or appended a 16-byte IV (Luna before 7.9.3); `functionFailed`
    ///   naming the call otherwise.
    public func sealAESGCMWithTokenIV(
        key: ObjectHandle,
        aad: [UInt8],
        plaintext: UnsafeRawBufferPointer
    ) throws -> AESGCMSealedBox {
        let ivCount = Session.gcmIVByteCount
        try checkGCMArguments(
            function: .encryptInit, iv: [UInt8](repeating: 0, count: ivCount), aad: aad, inputCount: plaintext.count)
        let sealedCount = plaintext.count + Session.gcmTagByteCount
        let capacity = sealedCount + Session.maximumAppendedGCMIVByteCount
        // Zeroed on purpose: CloudHSM ignores the contents, and a module that keeps them (one that
        // takes caller IVs) is caught below by finding them still zero.
        var iv = [UInt8](repeating: 0, count: ivCount)
        let output = try iv.withUnsafeMutableBufferPointer { ivBuffer in
            try aad.withUnsafeBufferPointer { aadBuffer in
                var parameters = CK_GCM_PARAMS(
                    pIv: ivBuffer.baseAddress,
                    ulIvLen: CK_ULONG(ivCount),
                    ulIvBits: CK_ULONG(ivCount * 8),
                    pAAD: aadBuffer.count == 0 ? nil : UnsafeMutablePointer(mutating: aadBuffer.baseAddress),
                    ulAADLen: CK_ULONG(aadBuffer.count),
                    ulTagBits: CK_ULONG(Session.gcmTagByteCount * 8)
                )
                return try withUnsafeMutablePointer(to: &parameters) { parameters in
                    var mechanism = CK_MECHANISM(
                        mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM),
                        pParameter: UnsafeMutableRawPointer(parameters),
                        ulParameterLen: CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size)
                    )
                    // CloudHSM's form: pIv to the zeroed buffer; Luna's: no IV buffer, 96 generated
                    // bits asked for. The form this module accepted last goes first.
                    func useForm(appended: Bool) {
                        parameters.pointee.pIv = appended ? nil : ivBuffer.baseAddress
                        parameters.pointee.ulIvLen = appended ? 0 : CK_ULONG(ivCount)
                    }
                    let appendedFirst = module.prefersAppendedGCMIV.load(ordering: .relaxed)
                    useForm(appended: appendedFirst)
                    let rv = try callReturningCode(.encryptInit, \.C_EncryptInit) {
                        $0(handle, &mechanism, key.rawValue)
                    }
                    if rv == CK_RV(CKR_MECHANISM_PARAM_INVALID) {
                        useForm(appended: !appendedFirst)
                        try call(.encryptInit, \.C_EncryptInit) { $0(handle, &mechanism, key.rawValue) }
                        module.prefersAppendedGCMIV.store(!appendedFirst, ordering: .relaxed)
                    } else if rv != CKR_OK {
                        throw PKCS11Error.failed(.encryptInit, rv)
                    }
                    let input = UnsafeMutablePointer(
                        mutating: plaintext.baseAddress?.assumingMemoryBound(to: CK_BYTE.self))
                    // An operation is active from here on: as in `encryptAESGCM`, any failure
                    // leaves the session unusable.
                    do {
                        return try [UInt8](unsafeUninitializedCapacity: capacity) { output, initialized in
                            var written = CK_ULONG(capacity)
                            try call(.encrypt, \.C_Encrypt) {
                                $0(handle, input, CK_ULONG(plaintext.count), output.baseAddress, &written)
                            }
                            initialized = try checkReported(.encrypt, written, capacity: capacity)
                        }
                    } catch let error as PKCS11Error {
                        throw unusable(error)
                    }
                }
            }
        }
        switch output.count {
        case sealedCount:
            // CloudHSM's form: the IV is in the buffer. All zero means the module never wrote it:
            // it encrypted under the zero IV it was given. The chance that a generated IV is all
            // zero is 2^-96.
            guard iv.contains(where: { $0 != 0 }) else {
                throw PKCS11Error(
                    code: .ivNotGenerated,
                    function: .encrypt,
                    detail: "the module left the IV buffer as given (it takes IVs from the caller, so "
                        + "hsm.gcm_iv: gateway fits it); the ciphertext was discarded"
                )
            }
            return AESGCMSealedBox(iv: iv, ciphertextAndTag: output)
        case sealedCount + ivCount:
            // Luna's form: ciphertext, tag, then the IV.
            return AESGCMSealedBox(iv: Array(output[sealedCount...]), ciphertextAndTag: Array(output[..<sealedCount]))
        case sealedCount + Session.maximumAppendedGCMIVByteCount:
            throw PKCS11Error(
                code: .ivNotGenerated,
                function: .encrypt,
                detail: "the module appended a \(Session.maximumAppendedGCMIVByteCount)-byte IV (Thales Luna firmware "
                    + "before 7.9.3 does in FIPS mode); the gateway stores 96-bit IVs: upgrade the firmware, or use "
                    + "hsm.gcm_iv: message where the module has PKCS#11 3.0 message-based encryption"
            )
        default:
            throw misbehaved(
                .encrypt,
                "reported \(output.count) bytes of GCM output, expected \(sealedCount) or \(sealedCount + ivCount) "
                    + "with an appended IV"
            )
        }
    }

    /// `sealAESGCMWithTokenIV` of bytes held in an array.
    public func sealAESGCMWithTokenIV(key: ObjectHandle, aad: [UInt8], plaintext: [UInt8]) throws -> AESGCMSealedBox {
        try plaintext.withUnsafeBytes { try sealAESGCMWithTokenIV(key: key, aad: aad, plaintext: $0) }
    }

    /// `sealAESGCMWithTokenIV` of secret bytes (key material).
    public func sealAESGCMWithTokenIV(key: ObjectHandle, aad: [UInt8], plaintext: SecretBytes) throws
        -> AESGCMSealedBox
    {
        try plaintext.withUnsafeBytes { try sealAESGCMWithTokenIV(key: key, aad: aad, plaintext: $0) }
    }

    func checkGCMArguments(function: PKCS11Function, iv: [UInt8], aad: [UInt8], inputCount: Int) throws {
        guard iv.count == Session.gcmIVByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM IV must be \(Session.gcmIVByteCount) bytes, got \(iv.count)"
            )
        }
        guard aad.count <= Session.maximumGCMAADByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM AAD of \(aad.count) bytes is over \(Session.maximumGCMAADByteCount)"
            )
        }
        guard inputCount >= 0 else {
            throw PKCS11Error(code: .invalidArgument, function: function, detail: "GCM input shorter than the tag")
        }
        guard inputCount <= Session.maximumGCMPlaintextByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM input of \(inputCount) bytes is over \(Session.maximumGCMPlaintextByteCount)"
            )
        }
    }

    /// Builds `CK_GCM_PARAMS` over `iv` and `aad`, which stay alive until `body` returns. The
    /// C struct's pointers are not const, but modules only read through them.
    private func withGCMMechanism<R>(
        iv: [UInt8],
        aad: [UInt8],
        _ body: (UnsafeMutablePointer<CK_MECHANISM>) throws -> R
    ) throws -> R {
        try iv.withUnsafeBufferPointer { ivBuffer in
            try aad.withUnsafeBufferPointer { aadBuffer in
                var parameters = CK_GCM_PARAMS(
                    pIv: UnsafeMutablePointer(mutating: ivBuffer.baseAddress),
                    ulIvLen: CK_ULONG(ivBuffer.count),
                    ulIvBits: CK_ULONG(ivBuffer.count * 8),
                    pAAD: aadBuffer.count == 0 ? nil : UnsafeMutablePointer(mutating: aadBuffer.baseAddress),
                    ulAADLen: CK_ULONG(aadBuffer.count),
                    ulTagBits: CK_ULONG(Session.gcmTagByteCount * 8)
                )
                return try withUnsafeMutablePointer(to: &parameters) { parameters in
                    var mechanism = CK_MECHANISM(
                        mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM),
                        pParameter: UnsafeMutableRawPointer(parameters),
                        ulParameterLen: CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size)
                    )
                    return try body(&mechanism)
                }
            }
        }
    }
}

/// Who makes the 96-bit IV of each AES-GCM encryption under a master key (`hsm.gcm_iv`).
/// Decryption is the same in every case (`C_Decrypt` with the stored IV), so the choice changes
/// nothing stored and can be changed between starts.
public enum GCMIVSource: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// The gateway draws the IV from the token's RNG (`C_GenerateRandom`) and passes it in
    /// `CK_GCM_PARAMS` (`sealAESGCM`): SoftHSM2, and HSMs not in a FIPS mode that forbids it.
    case gateway
    /// The module generates the IV inside `C_Encrypt` and returns it
    /// (`sealAESGCMWithTokenIV`): AWS CloudHSM, Thales Luna in FIPS mode.
    case token
    /// PKCS#11 3.0 message-based encryption with the token's IV generator
    /// (`C_EncryptMessage`, `CKG_GENERATE_RANDOM`).
    case message

    public var description: String { rawValue }
}

/// The output of `sealAESGCM`: the IV the token chose and ciphertext followed by the tag.
public struct AESGCMSealedBox: Hashable, Sendable {
    public let iv: [UInt8]
    public let ciphertextAndTag: [UInt8]

    public init(iv: [UInt8], ciphertextAndTag: [UInt8]) {
        self.iv = iv
        self.ciphertextAndTag = ciphertextAndTag
    }
}
