import GatewayTransport
import NIOCore
import Testing

/// The unit per-address limits count by: IPv4 per address, IPv6 per /64, IPv4-mapped IPv6 as
/// IPv4, Unix socket peers as one.
@Suite("Source address groups")
struct SourceAddressGroupTests {
    private func group(_ ip: String) throws -> SourceAddressGroup {
        SourceAddressGroup(try SocketAddress(ipAddress: ip, port: 4242))
    }

    @Test("IPv4: one group per address")
    func ipv4() throws {
        #expect(try group("192.0.2.7") == group("192.0.2.7"))
        #expect(try group("192.0.2.7") != group("192.0.2.8"))
        #expect(try group("192.0.2.7").description == "192.0.2.7")
        #expect(try group("10.255.0.1").description == "10.255.0.1")
    }

    @Test("IPv6: addresses in one /64 share a group; another /64 is another group")
    func ipv6() throws {
        let a = try group("2001:db8:1:2::1")
        let b = try group("2001:db8:1:2:ffff:ffff:ffff:ffff")
        let c = try group("2001:db8:1:2:a:b:c:d")
        #expect(a == b && b == c)
        #expect(a.description == "2001:db8:1:2::/64")
        #expect(try group("2001:db8:1:3::1") != a)
        #expect(try group("2001:db8:1:3::1").description == "2001:db8:1:3::/64")
        #expect(try group("2001:db9:1:2::1") != a)
        // Zero groups inside the prefix, and an all-zero prefix.
        #expect(try group("2001:0:0:5::9").description == "2001:0:0:5::/64")
        #expect(try group("2001:db8::1").description == "2001:db8::/64")
        #expect(try group("::1").description == "::/64")
        #expect(try group("fe80::1") == group("fe80::2"))
    }

    @Test("IPv4-mapped IPv6 counts as the IPv4 address it carries")
    func mapped() throws {
        #expect(try group("::ffff:192.0.2.7") == group("192.0.2.7"))
        #expect(try group("::ffff:192.0.2.7").description == "192.0.2.7")
        #expect(try group("::ffff:192.0.2.7") != group("::ffff:192.0.2.8"))
        // Not mapped (no ffff): an IPv6 address like any other.
        #expect(try group("::192.0.2.7").description == "::/64")
    }

    @Test("from the transport's description of a peer: ports dropped, brackets removed")
    func fromRemoteAddress() throws {
        #expect(SourceAddressGroup(remoteAddress: "192.0.2.7:51234") == (try group("192.0.2.7")))
        #expect(SourceAddressGroup(remoteAddress: "[2001:db8:1:2::99]:443") == (try group("2001:db8:1:2::1")))
        #expect(SourceAddressGroup(remoteAddress: "[::ffff:192.0.2.7]:1") == (try group("192.0.2.7")))
        #expect(SourceAddressGroup(remoteAddress: "unix") == .unixDomainSocket)
        #expect(SourceAddressGroup(remoteAddress: "unix").isUnixDomainSocket)
        #expect(SourceAddressGroup(remoteAddress: "unix").description == "unix")
        // Something else is a group of its own, compared as text.
        #expect(SourceAddressGroup(remoteAddress: "unknown").description == "unknown")
        #expect(SourceAddressGroup(remoteAddress: "unknown") != SourceAddressGroup(remoteAddress: "other"))
        #expect(!(try group("192.0.2.7")).isUnixDomainSocket)
    }
}
