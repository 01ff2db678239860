import Foundation
import KeyHierarchy
import Testing

@Suite("Identifiers: tenant ids, data key ids, timestamps, principals")
struct IdentifiersTests {
    // MARK: TenantID

    @Test(
        "TenantID accepts",
        arguments: [
            "a", "0", "tenant-1", "a_b", "a-", "9-_", String(repeating: "a", count: 63),
            "z" + String(repeating: "-", count: 62),
        ]
    )
    func tenantAccepted(raw: String) throws {
        let id = try TenantID(raw)
        #expect(id.rawValue == raw)
        #expect(id.description == raw)
    }

    @Test(
        "TenantID refuses",
        arguments: [
            "", String(repeating: "a", count: 64), "A", "Tenant", "tenAnt", "-a", "_a", "-", "a:b", ":", "a b", " a",
            "a\n", "a.b", "a/b", "\u{e9}", "caf\u{e9}", "t\u{0}", "\u{1F511}",
        ]
    )
    func tenantRefused(raw: String) {
        let error = #expect(throws: KeyServiceError.self) { try TenantID(raw) }
        #expect(error?.code == .invalidArgument)
    }

    @Test("TenantID length is counted in UTF-8 bytes")
    func tenantLengthIsBytes() {
        // 63 bytes of ASCII is the limit; a non-ASCII string of 32 characters is 64 bytes long.
        let error = #expect(throws: KeyServiceError.self) {
            try TenantID(String(repeating: "\u{e9}", count: 32))
        }
        #expect(error?.message.contains("1 to 63") == true)
    }

    @Test("TenantID orders by its raw value")
    func tenantOrdering() throws {
        let ids = try ["b", "a-1", "a", "a_1", "10", "1"].map { try TenantID($0) }
        #expect(ids.sorted().map(\.rawValue) == ["1", "10", "a", "a-1", "a_1", "b"])
    }

    // MARK: DataKeyID

    @Test("DataKeyID: known bytes give the lowercase canonical UUID text")
    func dataKeyIDKnownValue() throws {
        let id = try #require(DataKeyID(bytes: Array(0..<16)))
        #expect(id.description == "00010203-0405-0607-0809-0a0b0c0d0e0f")
        #expect(id.bytes == Array(0..<16))
        #expect(try DataKeyID("00010203-0405-0607-0809-0a0b0c0d0e0f") == id)
        #expect(try DataKeyID("00010203-0405-0607-0809-0A0B0C0D0E0F") == id)
    }

    @Test("DataKeyID round-trips through its string and its bytes")
    func dataKeyIDRoundTrip() throws {
        for _ in 0..<100 {
            let id = DataKeyID.random()
            #expect(id.description == id.description.lowercased())
            #expect(id.description.utf8.count == 36)
            #expect(try DataKeyID(id.description) == id)
            #expect(id.bytes.count == 16)
            #expect(DataKeyID(bytes: id.bytes) == id)
            #expect(DataKeyID(bytes: id.bytes[...]) == id)
        }
    }

    @Test(
        "DataKeyID refuses strings that are not a UUID",
        arguments: [
            "", "not-a-uuid", "00010203-0405-0607-0809-0a0b0c0d0e0", "00010203-0405-0607-0809-0a0b0c0d0e0f0",
            "000102030405060708090a0b0c0d0e0f", "{00010203-0405-0607-0809-0a0b0c0d0e0f}",
            " 00010203-0405-0607-0809-0a0b0c0d0e0f", "0001020g-0405-0607-0809-0a0b0c0d0e0f",
            "00010203_0405_0607_0809_0a0b0c0d0e0f",
        ]
    )
    func dataKeyIDRefused(string: String) {
        let error = #expect(throws: KeyServiceError.self) { try DataKeyID(string) }
        #expect(error?.code == .invalidArgument)
    }

    @Test("DataKeyID(bytes:) needs exactly 16 bytes", arguments: [0, 1, 15, 17, 32])
    func dataKeyIDWrongByteCount(count: Int) {
        #expect(DataKeyID(bytes: [UInt8](repeating: 7, count: count)) == nil)
    }

    @Test("DataKeyID order is the order of its string form (and of its bytes)")
    func dataKeyIDOrdering() {
        let ids = (0..<300).map { _ in DataKeyID.random() }
        let byID = ids.sorted()
        #expect(byID.map(\.description) == ids.map(\.description).sorted())
        #expect(byID.map(\.bytes) == ids.map(\.bytes).sorted { $0.lexicographicallyPrecedes($1) })
        for (lhs, rhs) in zip(ids, ids.reversed()) {
            #expect((lhs < rhs) == (lhs.description < rhs.description))
        }
    }

    // MARK: Timestamp

    @Test("Timestamp from a Date keeps whole milliseconds, to the nearest")
    func timestampFromDate() {
        #expect(Timestamp(Date(timeIntervalSince1970: 0)).millisecondsSinceEpoch == 0)
        #expect(Timestamp(Date(timeIntervalSince1970: 0.999)).millisecondsSinceEpoch == 999)
        #expect(Timestamp(Date(timeIntervalSince1970: 1.2344)).millisecondsSinceEpoch == 1234)
        #expect(Timestamp(Date(timeIntervalSince1970: 1.2346)).millisecondsSinceEpoch == 1235)
        #expect(Timestamp(Date(timeIntervalSince1970: 1_700_000_000.5)).millisecondsSinceEpoch == 1_700_000_000_500)
        #expect(Timestamp(Date(timeIntervalSince1970: -0.0004)).millisecondsSinceEpoch == 0)
        #expect(Timestamp(Date(timeIntervalSince1970: -0.0006)).millisecondsSinceEpoch == -1)
        #expect(Timestamp(Date(timeIntervalSince1970: -1.5)).millisecondsSinceEpoch == -1500)
    }

    @Test("Timestamp to a Date")
    func timestampToDate() {
        let date = Timestamp(millisecondsSinceEpoch: 1_700_000_000_250).date
        #expect(abs(date.timeIntervalSince1970 - 1_700_000_000.25) < 1e-6)
        #expect(Timestamp(millisecondsSinceEpoch: 0).date == Date(timeIntervalSince1970: 0))
    }

    @Test("Timestamp round-trips exactly through Date")
    func timestampDateRoundTrip() {
        let fixed: [Int64] = [0, 1, -1, 999, -999, 1_000, 123_456]
        let now: [Int64] = (0..<2_000).map { 1_700_000_000_000 + $0 }
        let anyTime: [Int64] = (0..<10_000).map { _ in Int64.random(in: -4_102_444_800_000...4_102_444_800_000) }
        let candidates = fixed + now + anyTime
        let broken = candidates.filter {
            Timestamp(Timestamp(millisecondsSinceEpoch: $0).date).millisecondsSinceEpoch != $0
        }
        #expect(broken.isEmpty, "\(broken.count) values change: \(broken.prefix(5))")
    }

    @Test("Timestamp.adding(days:)", arguments: [0, 1, -1, 7, 30, 365, -365])
    func timestampAddingDays(days: Int) {
        let start = Timestamp(millisecondsSinceEpoch: 1_700_000_000_123)
        let later = start.adding(days: days)
        #expect(later.millisecondsSinceEpoch - start.millisecondsSinceEpoch == Int64(days) * 86_400_000)
        #expect(abs(later.date.timeIntervalSince(start.date) - Double(days) * 86_400) < 0.001)
    }

    @Test("Timestamps order by milliseconds")
    func timestampOrdering() {
        let earlier = Timestamp(millisecondsSinceEpoch: -5)
        let later = Timestamp(millisecondsSinceEpoch: 5)
        #expect(earlier < later)
        #expect(!(later < earlier))
        #expect(later.adding(days: -1) < earlier)
        #expect(Timestamp.now() > Timestamp(millisecondsSinceEpoch: 1_700_000_000_000))
    }

    // MARK: Principal and RequestContext

    @Test("Principal keeps names up to 256 bytes", arguments: [0, 1, 255, 256])
    func principalShortEnough(length: Int) {
        let name = String(repeating: "p", count: length)
        #expect(Principal(name).name == name)
    }

    @Test("Principal truncates longer names to their first 256 bytes", arguments: [257, 300, 10_000])
    func principalTruncated(length: Int) {
        let name = String(repeating: "p", count: length)
        #expect(Principal(name).name == String(repeating: "p", count: 256))
    }

    @Test("Principal keeps 256 bytes of two-byte characters when the limit falls between characters")
    func principalTruncatedOnBoundary() {
        let name = String(repeating: "\u{e9}", count: 200)  // 400 bytes
        #expect(Principal(name).name == String(repeating: "\u{e9}", count: 128))
    }

    /// The limit falling inside a character must drop that character, not the whole name: a
    /// principal recorded as "invalid" loses who acted and collides with a real "invalid".
    @Test("Principal truncation inside a multi-byte character keeps the whole characters before it")
    func principalTruncatedInsideCharacter() {
        let name = "a" + String(repeating: "\u{e9}", count: 200)  // 401 bytes; byte 256 splits an é
        let truncated = Principal(name).name
        #expect(truncated == "a" + String(repeating: "\u{e9}", count: 127))
        #expect(truncated.utf8.count <= Principal.maximumLength)
    }

    @Test("Principal.system is named system")
    func systemPrincipal() {
        #expect(Principal.system.name == "system")
        #expect(RequestContext.system("r-1").principal == .system)
        #expect(RequestContext.system("r-1").requestID == "r-1")
    }

    @Test("RequestContext truncates request ids to 128 bytes")
    func requestIDTruncated() {
        let long = String(repeating: "r", count: 500)
        #expect(RequestContext(principal: .system, requestID: long).requestID == String(repeating: "r", count: 128))
        #expect(RequestContext(principal: .system, requestID: "abc").requestID == "abc")
        #expect(RequestContext(principal: .system).requestID.utf8.count == 36)
    }

    @Test("RequestContext truncation inside a multi-byte character keeps the whole characters before it")
    func requestIDTruncatedInsideCharacter() {
        let long = "r" + String(repeating: "\u{e9}", count: 100)  // byte 128 splits an é
        let requestID = RequestContext(principal: .system, requestID: long).requestID
        #expect(requestID == "r" + String(repeating: "\u{e9}", count: 63))
    }
}
