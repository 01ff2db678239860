import Testing

@testable import KeyHierarchy

@Suite("Tenant key cache: one seam to forget a tenant")
struct TenantKeyCacheTests {
    @Test func invalidateForgetsOneTenantOnly() throws {
        let cache = TenantKeyCache()
        let a = TenantID(trusted: "a")
        let b = TenantID(trusted: "b")
        let a1 = TenantKeyCache.VersionRef(tenant: a, version: 1)
        let b1 = TenantKeyCache.VersionRef(tenant: b, version: 1)
        cache.setPrimary(a, 2)
        cache.setPrimary(b, 1)
        cache.setTokenKey(a1, TokenKeyReference(id: TokenKeyID.random(), tenant: a, version: 1))
        cache.setTokenKey(b1, TokenKeyReference(id: TokenKeyID.random(), tenant: b, version: 1))

        cache.invalidate(a)
        #expect(cache.primary(a) == nil)
        #expect(cache.tokenKey(a1) == nil)
        #expect(cache.primary(b) == 1)
        #expect(cache.tokenKey(b1) != nil)

        cache.forgetPrimary(b)
        #expect(cache.primary(b) == nil)
        #expect(cache.tokenKey(b1) != nil)
        cache.forgetTokenKey(b1)
        #expect(cache.tokenKey(b1) == nil)
    }
}
