import Foundation
import GatewayClient
import GatewayTransport
import GatewayWire
import KeyHierarchy
import ProcessTestSupport
import Testing

/// Client certificates (mTLS): a verified certificate's subject CN authenticates as the principal
/// it is mapped to; with a token too, both must name the same principal.
@Suite("Mutual TLS end to end", .serialized)
struct MutualTLSTests {
    @Test(arguments: StoreKind.allCases)
    func optionalClientCertificates(_ kind: StoreKind) async throws {
        try await withGateway(kind, "mtls-opt-\(kind)", security: .mutualTLS(.optional)) { gateway in
            let pki = try TestCertificates.shared()
            // Without a certificate, the token alone still works (optional mode).
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let created = try await admin.createCertificatePrincipal(
                "billing", commonName: "billing-service", tenant: "acme")
            #expect(created.principal.certificateCommonName == "billing-service")

            // The certificate alone.
            let billing = try gateway.client(token: nil, certificate: try pki.client(commonName: "billing-service"))
            #expect(try await billing.hello().principal == "billing")
            let key = try await billing.generateDataKey(tenant: "acme", context: ["k": "v"])
            #expect(try await billing.decryptDataKey(tenant: "acme", id: key.id, context: ["k": "v"]).id == key.id)
            await expectStatus(.permissionDenied) { try await billing.createTenant("other") }
            await billing.shutdown()

            // Certificate and token of the same principal.
            let token = try await admin.createAPIToken(principal: "billing")
            let both = try gateway.client(
                token: token.token.value, certificate: try pki.client(commonName: "billing-service"))
            #expect(try await both.hello().principal == "billing")
            await both.shutdown()

            // Certificate and token of different principals: refused, audited.
            let mixed = try gateway.client(
                token: gateway.adminToken, certificate: try pki.client(commonName: "billing-service"))
            await expectStatus(.unauthenticated) { try await mixed.serverInfo() }
            await mixed.shutdown()

            // A verified certificate that names nobody: refused, audited.
            let stranger = try gateway.client(token: nil, certificate: try pki.client(commonName: "stranger"))
            await expectStatus(.unauthenticated) { try await stranger.serverInfo() }
            await stranger.shutdown()

            // A certificate from a CA the server does not trust never gets to Hello.
            let rogue = try gateway.client(
                token: nil, certificate: try pki.untrustedClient(commonName: "billing-service"))
            #expect(await gatewayError({ try await rogue.serverInfo() }) != nil)
            await rogue.shutdown()

            await gateway.app.handler.flushRefusedHelloAudit()
            let refusals = try await admin.listAuditRecords(limit: 1000).filter {
                $0.operation == "access.authenticate"
            }
            #expect(refusals.contains { $0.detail.contains("reason=token-and-certificate-differ") })
            #expect(
                refusals.contains { $0.detail.contains("reason=unknown-certificate") && $0.detail.contains("stranger") }
            )
        }
    }

    @Test func requiredClientCertificates() async throws {
        try await withGateway(.sqlite, "mtls-req", security: .mutualTLS(.required)) { gateway in
            let pki = try TestCertificates.shared()
            _ = try await gateway.app.service.createPrincipal(
                PrincipalName("ops"),
                certificateCommonName: CertificateCommonName("ops-cli"),
                roles: [KeyHierarchy.RoleBinding(scope: .all, role: .admin)],
                request: RequestContext(principal: .system, requestID: "test")
            )
            // No certificate: the TLS handshake fails, whatever the token.
            let tokenOnly = try gateway.client(token: gateway.adminToken)
            #expect(await gatewayError({ try await tokenOnly.serverInfo() }) != nil)
            await tokenOnly.shutdown()

            let ops = try gateway.client(token: nil, certificate: try pki.client(commonName: "ops-cli"))
            #expect(try await ops.hello().principal == "ops")
            _ = try await ops.createTenant("acme")
            let key = try await ops.generateDataKey(tenant: "acme")
            #expect(key.wrapped.count == 83)
            #expect(try await ops.listPrincipals().map(\.name).sorted() == ["admin", "ops"])
            await ops.shutdown()
        }
    }

    /// A certificate the CA verified but without the clientAuth extended key usage never gets to
    /// Hello: the TLS handshake fails, in required and optional mode alike (a token next to it
    /// does not make the server ignore it), and the gateway keeps serving everyone else.
    @Test(arguments: [ServerConfiguration.TLS.ClientCertificates.required, .optional])
    func certificatesWithoutClientAuthAreRefused(_ mode: ServerConfiguration.TLS.ClientCertificates) async throws {
        try await withGateway(.sqlite, "mtls-eku-\(mode)", security: .mutualTLS(mode)) { gateway in
            let pki = try TestCertificates.shared()
            _ = try await gateway.app.service.createPrincipal(
                PrincipalName("ops"),
                certificateCommonName: CertificateCommonName("ops-cli"),
                roles: [KeyHierarchy.RoleBinding(scope: .all, role: .admin)],
                request: RequestContext(principal: .system, requestID: "test")
            )
            let ops = try gateway.client(token: nil, certificate: try pki.client(commonName: "ops-cli"))
            defer { Task { await ops.shutdown() } }
            #expect(try await ops.hello().principal == "ops")

            for usage: String? in [nil, "serverAuth", "anyExtendedKeyUsage"] {
                let certificate = try pki.client(commonName: "ops-cli", extendedKeyUsage: usage)
                let refused = try gateway.client(token: gateway.adminToken, certificate: certificate)
                let error = await gatewayError { try await refused.serverInfo() }
                #expect(error?.code == .unavailable, "\(usage ?? "no extendedKeyUsage"): \(String(describing: error))")
                #expect(error?.requestProvablyNotProcessed == true)
                await refused.shutdown()
            }

            // The connection opened before is still served, and so is a new one.
            #expect(try await ops.listPrincipals().map(\.name).sorted() == ["admin", "ops"])
            let again = try gateway.client(token: nil, certificate: try pki.client(commonName: "ops-cli"))
            #expect(try await again.hello().principal == "ops")
            await again.shutdown()
            // Refused before any Hello: no authentication was attempted, so none was audited.
            await gateway.app.handler.flushRefusedHelloAudit()
            let attempts = try await ops.listAuditRecords(limit: 1000).filter { $0.operation == "access.authenticate" }
            #expect(attempts.isEmpty, "\(attempts)")
        }
    }
}
