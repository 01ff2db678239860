import NIOCore

/// The unit that per-address limits count by: the failed-authentication throttle and the
/// per-address connection cap.
///
/// - An IPv4 address is its own group: a host, or a NAT gateway in front of several.
/// - An IPv6 address counts by its /64 prefix (``ipv6PrefixLength``): one subscriber, host or LAN
///   is given a whole /64 and can pick any of its 2^64 addresses, so counting per full address
///   would let one peer escape every per-address limit by changing its interface identifier.
/// - An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack listener on `::` sees for an
///   IPv4 peer) counts as the IPv4 address it carries, so one peer is one group on either stack.
/// - Every peer of a Unix domain socket is one group, ``unixDomainSocket``.
public struct SourceAddressGroup: Hashable, Sendable, CustomStringConvertible {
    /// The IPv6 prefix length that makes one group.
    public static let ipv6PrefixLength = 64

    private enum Value: Hashable, Sendable {
        case ipv4(UInt32)
        /// The first 64 bits of the address, in network order.
        case ipv6(UInt64)
        case unixDomainSocket
        /// A description this type cannot parse: a group of its own, compared as text.
        case other(String)
    }

    private let value: Value

    private init(_ value: Value) { self.value = value }

    /// Every peer of a Unix domain socket.
    public static let unixDomainSocket = SourceAddressGroup(.unixDomainSocket)

    /// The group of a peer's socket address.
    public init(_ address: SocketAddress) {
        switch address {
        case .v4(let v4):
            self.init(.ipv4(UInt32(bigEndian: v4.address.sin_addr.s_addr)))
        case .v6(let v6):
            var sixteen = v6.address.sin6_addr
            let bytes = withUnsafeBytes(of: &sixteen) { Array($0) }
            self.init(ipv6Bytes: bytes)
        case .unixDomainSocket:
            self.init(.unixDomainSocket)
        }
    }

    /// The group of a peer as ``ConnectionInfo/remoteAddress`` describes it (`192.0.2.7:51234`,
    /// `[2001:db8::1]:443`, `unix`). A description that is not one of these is a group of its own.
    public init(remoteAddress: String) {
        if remoteAddress == "unix" {
            self.init(.unixDomainSocket)
            return
        }
        let host: Substring
        if remoteAddress.hasPrefix("["), let end = remoteAddress.firstIndex(of: "]") {
            host = remoteAddress[remoteAddress.index(after: remoteAddress.startIndex)..<end]
        } else if let colon = remoteAddress.lastIndex(of: ":"), !remoteAddress[..<colon].contains(":") {
            host = remoteAddress[..<colon]
        } else {
            host = Substring(remoteAddress)
        }
        if let address = try? SocketAddress(ipAddress: String(host), port: 0) {
            self.init(address)
        } else {
            self.init(.other(remoteAddress))
        }
    }

    private init(ipv6Bytes bytes: [UInt8]) {
        precondition(bytes.count == 16)
        // ::ffff:a.b.c.d (RFC 4291 2.5.5.2): the IPv4 peer of a dual-stack socket.
        if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            let v4 = bytes[12...].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            self.init(.ipv4(v4))
            return
        }
        self.init(.ipv6(bytes[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }))
    }

    /// Whether this is the group of Unix domain socket peers (local processes the socket file's
    /// permissions admit).
    public var isUnixDomainSocket: Bool { value == .unixDomainSocket }

    /// `192.0.2.7`, `2001:db8:1:2::/64`, `unix`: for logs, metrics-free audit details and keys.
    public var description: String {
        switch value {
        case .ipv4(let address):
            return "\(address >> 24).\(address >> 16 & 0xFF).\(address >> 8 & 0xFF).\(address & 0xFF)"
        case .ipv6(let prefix):
            let groups = (0..<4).map { UInt16(truncatingIfNeeded: prefix >> (48 - 16 * $0)) }
            // The last 64 bits are zero: the text ends in `::` (RFC 5952), after the prefix's
            // own trailing zero groups, which that `::` absorbs.
            var significant = groups
            while significant.last == 0 { significant.removeLast() }
            let text = significant.map { String($0, radix: 16) }.joined(separator: ":")
            return text + "::/\(Self.ipv6PrefixLength)"
        case .unixDomainSocket:
            return "unix"
        case .other(let text):
            return text
        }
    }
}
