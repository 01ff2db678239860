import Foundation
import GatewayWire
import Testing

@testable import HSMAdmin

/// Tables, field lists, times and the JSON views.
@Suite("hsm-admin rendering")
struct RenderingTests {
    @Test("tables align columns, right-align numbers and leave no trailing blanks")
    func table() {
        var table = TextTable([.init("NAME"), .init("COUNT", .right), .init("NOTE")])
        table.append(["alpha", "7", ""])
        table.append(["b", "12345", "long note"])
        #expect(
            table.render() == """
                NAME   COUNT  NOTE
                alpha      7
                b      12345  long note

                """
        )
        #expect(table.widths == [5, 5, 9])
    }

    @Test("an empty table is its header; short rows are padded, long ones cut")
    func emptyAndRagged() {
        var table = TextTable([.init("A"), .init("B")])
        #expect(table.render() == "A  B\n")
        table.append(["only"])
        table.append(["x", "y", "dropped"])
        #expect(table.rows == [["only", ""], ["x", "y"]])
        #expect(table.render() == "A     B\nonly\nx     y\n")
    }

    @Test("cells cannot move the cursor: control characters become ?")
    func sanitised() {
        var table = TextTable([.init("DETAIL")])
        table.append(["evil\u{1B}[2J\r\nline\u{7}\u{9B}x"])
        #expect(table.rows[0][0] == "evil?[2J??line???x".replacingOccurrences(of: "???", with: "??"))
        #expect(!table.render().contains("\u{1B}"))
        #expect("plain text é 漢".sanitizedForTerminal == "plain text é 漢")
        var fields = FieldList()
        fields.append("name", "a\u{1B}b")
        #expect(fields.render() == "name  a?b\n")
    }

    @Test("field lists align values")
    func fieldList() {
        var fields = FieldList()
        fields.append("tenant", "acme")
        fields.append("primary master key", "v2")
        fields.append("note", "")
        #expect(fields.render() == "tenant              acme\nprimary master key  v2\nnote\n")
        #expect(FieldList().render() == "")
    }

    @Test("audit verify: an anchored log, and a rewritten one naming the checkpoint it breaks")
    func auditVerification() {
        var intact = Hsmgw_V1_VerifyAuditLogResponse()
        intact.intact = true
        intact.recordsChecked = 31
        intact.headSequence = 31
        intact.headHash = Data([0xAB, 0xCD])
        intact.checkpointsChecked = 8
        intact.anchoredThrough = 31
        #expect(
            AuditVerificationView(intact).fields.render() == """
                audit chain      intact
                records checked  31
                head             #31 abcd
                HSM checkpoints  8 verified
                anchored up to   #31

                """
        )
        var broken = Hsmgw_V1_VerifyAuditLogResponse()
        broken.recordsChecked = 14
        broken.headSequence = 31
        broken.checkpointsChecked = 3
        broken.problemSequence = 15
        broken.problemKind = "anchor-mismatch"
        broken.problem = "anchor-mismatch: the checkpoint at record 15 does not match the record"
        let view = AuditVerificationView(broken)
        #expect(view.anchoredThrough == nil)
        #expect(view.problemKind == "anchor-mismatch")
        #expect(view.fields.render().contains("first bad record  #15\n"))
    }

    @Test("times are UTC ISO 8601; 0 is unset")
    func timestamps() {
        #expect(Timestamp.iso8601(milliseconds: 0) == nil)
        #expect(Timestamp.text(milliseconds: 0) == "-")
        #expect(Timestamp.iso8601(milliseconds: 1_700_000_000_123) == "2023-11-14T22:13:20.123Z")
        #expect(Timestamp.text(milliseconds: 1_700_000_000_123) == "2023-11-14 22:13:20Z")
        #expect(Timestamp.iso8601(milliseconds: 5) == "1970-01-01T00:00:00.005Z")
        #expect(Timestamp.iso8601(milliseconds: -1) == "1969-12-31T23:59:59.999Z")
        #expect([UInt8]([0x00, 0x0F, 0xA0, 0xFF]).lowercaseHex == "000fa0ff")
        #expect(byteCount(1 << 20) == "1 MiB")
        #expect(byteCount(16 << 20) == "16 MiB")
        #expect(byteCount(64 << 10) == "64 KiB")
        #expect(byteCount(1000) == "1000 bytes")
        #expect(byteCount((1 << 20) + 1) == "1048577 bytes")
    }

    @Test("views encode the documented JSON fields")
    func tenantJSON() throws {
        var info = Hsmgw_V1_TenantInfo()
        info.id = "acme"
        info.state = "enabled"
        info.primaryMasterKeyVersion = 2
        info.createdAtMs = 1_700_000_000_000
        let view = TenantView(info)
        let json = try #require(
            try JSONSerialization.jsonObject(with: Data(AdminJSON.document(view).utf8)) as? [String: Any])
        #expect(Set(json.keys) == ["id", "state", "primaryMasterKeyVersion", "createdAt"])
        #expect(json["createdAt"] as? String == "2023-11-14T22:13:20.000Z")
        #expect(json["primaryMasterKeyVersion"] as? Int == 2)
        #expect(TenantView.table([view]).render().contains("acme    enabled       v2  2023-11-14 22:13:20Z  -"))
        #expect(AdminJSON.line(view).split(separator: "\n").count == 1)
        #expect(AdminJSON.line(view).hasSuffix("}\n"))
    }

    @Test("audit records: hashes in hex, JSON line per record, fixed columns")
    func auditRecord() throws {
        var record = Hsmgw_V1_AuditRecordInfo()
        record.sequence = 42
        record.timeMs = 1_700_000_000_000
        record.principal = "admin"
        record.tenant = "acme"
        record.operation = "RotateMasterKey"
        record.outcome = "ok"
        record.keyIds = ["k1", "k2"]
        record.hash = Data([0xAB, 0x01])
        record.previousHash = Data([0x00])
        let view = AuditRecordView(record)
        let decoded = try JSONDecoder().decode(AuditRecordView.self, from: Data(AdminJSON.line(view).utf8))
        #expect(decoded.hash == "ab01")
        #expect(decoded.previousHash == "00")
        #expect(decoded.keyIds == ["k1", "k2"])
        #expect(decoded.time == "2023-11-14T22:13:20.000Z")
        #expect(
            view.cells == ["42", "2023-11-14 22:13:20Z", "admin", "acme", "RotateMasterKey", "ok", "k1,k2", ""])
        #expect(AuditRecordView.columns.count == view.cells.count)
        #expect(AuditRecordView.columns.count == AuditTailCommand.followWidths.count)
    }

    @Test("token state: revoked beats expired beats active")
    func tokenState() {
        #expect(APITokenView.state(expiresAtMs: 0, revokedAtMs: 0, now: 10) == "active")
        #expect(APITokenView.state(expiresAtMs: 11, revokedAtMs: 0, now: 10) == "active")
        #expect(APITokenView.state(expiresAtMs: 10, revokedAtMs: 0, now: 10) == "expired")
        #expect(APITokenView.state(expiresAtMs: 5, revokedAtMs: 7, now: 10) == "revoked")
        var info = Hsmgw_V1_APITokenInfo()
        info.id = "tok_0123456789abcdef"
        info.principal = "ci"
        info.expiresAtMs = 0
        let view = APITokenView(info, now: 1)
        #expect(view.expiresAt == nil)
        #expect(APITokenView.table([view]).render().contains("tok_0123456789abcdef  ci         active  -        never"))
    }

    func job(_ state: String, moved: UInt64, total: UInt64) -> RewrapJobView {
        var info = Hsmgw_V1_RewrapJobInfo()
        info.tenant = "acme"
        info.targetVersion = 3
        info.state = state
        info.moved = moved
        info.total = total
        return RewrapJobView(info)
    }

    @Test("rewrap progress text")
    func rewrapProgress() {
        #expect(job("running", moved: 1234, total: 5000).progressText == "1234/5000 (24.6%)")
        #expect(job("completed", moved: 0, total: 0).progressText == "0/0 (100.0%)")
        #expect(job("running", moved: 1, total: 3).line == "rewrap acme to v3: running, 1/3 (33.3%)")
        #expect(job("running", moved: 1, total: 3).isFinished == false)
        #expect(job("completed", moved: 3, total: 3).isFinished)
    }

    @Test("--watch redraws one line on a terminal and prints a line per change elsewhere")
    func rewrapWatchOutput() throws {
        let updates = [
            job("running", moved: 0, total: 4), job("running", moved: 0, total: 4), job("running", moved: 2, total: 4),
            job("completed", moved: 4, total: 4),
        ]
        var terminal = RewrapProgressPrinter(json: false, terminal: true)
        let drawn = updates.map { terminal.update($0) }
        #expect(drawn.allSatisfy { $0.hasPrefix("\r\u{1B}[K") })
        #expect(drawn.last?.hasSuffix("(100.0%)\n") == true)
        #expect(drawn.dropLast().allSatisfy { !$0.contains("\n") })

        var pipe = RewrapProgressPrinter(json: false, terminal: false)
        let lines = updates.map { pipe.update($0) }.joined()
        #expect(
            lines == """
                rewrap acme to v3: running, 0/4 (0.0%)
                rewrap acme to v3: running, 2/4 (50.0%)
                rewrap acme to v3: completed, 4/4 (100.0%)

                """
        )

        var json = RewrapProgressPrinter(json: true, terminal: true)
        let objects = updates.map { json.update($0) }.joined().split(separator: "\n")
        #expect(objects.count == 3)
        for object in objects {
            _ = try JSONDecoder().decode(RewrapJobView.self, from: Data(object.utf8))
        }
    }
}
