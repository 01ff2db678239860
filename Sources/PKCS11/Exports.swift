// `SecretBytes` lives in its own small target so the domain core can hold key material without
// depending on the PKCS#11 layer; PKCS#11 callers keep seeing it through this module.
@_exported import SecretMemory
