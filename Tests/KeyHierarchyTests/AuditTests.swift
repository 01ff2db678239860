import KeyHierarchy
import Testing

@Suite("Audit: hash chain, verification and tampering")
struct AuditTests {
    static let count = 50

    /// Events with every field varied, so each field's edit is visible.
    static func events(_ count: Int = count, start: Int = 0) -> [AuditEvent] {
        let operations = AuditOperation.allCases
        return (start..<start + count).map { index in
            AuditEvent(
                time: Timestamp(millisecondsSinceEpoch: 1_700_000_000_000 + Int64(index) * 1_000),
                principal: Principal("user-\(index % 4)"),
                tenant: index % 5 == 0 ? nil : TenantID(trusted: "tenant-\(index % 3)"),
                operation: operations[index % operations.count],
                keyIDs: (0..<index % 4).map { "key-\(index)-\($0)" },
                outcome: index % 7 == 0 ? .failure("not found") : .success,
                requestID: "request-\(index)",
                detail: index % 2 == 0 ? "" : "count=\(index)"
            )
        }
    }

    static func chain(_ count: Int = count) -> (records: [AuditRecord], head: AuditHead) {
        AuditChain.link(events(count), after: .genesis)
    }

    static func broken(_ verification: AuditVerification) -> AuditProblem? {
        if case .broken(let problem) = verification { return problem }
        return nil
    }

    // MARK: A clean chain

    @Test("a clean chain of 50 events verifies")
    func cleanChain() {
        let (records, head) = Self.chain()
        #expect(records.count == 50)
        #expect(head.sequence == 50)
        #expect(head.hash == records.last?.hash)
        #expect(AuditChain.verify(records, head: head) == .verified(records: 50, head: head))
    }

    @Test("linking numbers from 1 and links each record to the one before")
    func linking() {
        let (records, _) = Self.chain()
        #expect(records.map(\.sequence) == Array(1...50))
        #expect(records[0].previousHash == [UInt8](repeating: 0, count: 32))
        for (previous, record) in zip(records, records.dropFirst()) {
            #expect(record.previousHash == previous.hash)
        }
        for record in records {
            #expect(record.hash.count == 32)
            #expect(
                record.hash
                    == AuditChain.hash(
                        sequence: record.sequence, event: record.event, previousHash: record.previousHash))
        }
        #expect(Set(records.map(\.hash)).count == records.count)
    }

    @Test("linking in two batches gives the same chain as linking once")
    func linkingInBatches() {
        let events = Self.events()
        let whole = AuditChain.link(events, after: .genesis)
        let first = AuditChain.link(Array(events[..<20]), after: .genesis)
        let second = AuditChain.link(Array(events[20...]), after: first.head)
        #expect(first.records + second.records == whole.records)
        #expect(second.head == whole.head)
    }

    @Test("linking is deterministic")
    func deterministic() {
        #expect(Self.chain() == Self.chain())
    }

    @Test("genesis: sequence 0, 32 zero bytes; the empty log verifies against it")
    func genesis() {
        #expect(AuditHead.genesis.sequence == 0)
        #expect(AuditHead.genesis.hash == [UInt8](repeating: 0, count: 32))
        let linked = AuditChain.link([], after: .genesis)
        #expect(linked.records.isEmpty)
        #expect(linked.head == .genesis)
        #expect(AuditChain.verify([], head: .genesis) == .verified(records: 0, head: .genesis))
    }

    @Test("an empty log whose head says 3 records is missing record 1")
    func emptyLogWithHead() {
        let (records, _) = Self.chain(3)
        let problem = Self.broken(AuditChain.verify([], head: AuditHead(sequence: 3, hash: records[2].hash)))
        #expect(problem?.kind == .missing)
        #expect(problem?.sequence == 1)
    }

    @Test("a chain that does not start at genesis is refused at its first record")
    func notFromGenesis() {
        let linked = AuditChain.link(
            Self.events(5), after: AuditHead(sequence: 0, hash: [UInt8](repeating: 1, count: 32)))
        let problem = Self.broken(AuditChain.verify(linked.records, head: linked.head))
        #expect(problem?.kind == .inserted)
        #expect(problem?.sequence == 1)
    }

    @Test("the verifier walks record by record and reports the count so far")
    func incremental() {
        let (records, head) = Self.chain()
        var verifier = AuditVerifier()
        for record in records {
            #expect(
                verifier.check(record)
                    == .verified(
                        records: record.sequence, head: AuditHead(sequence: record.sequence, hash: record.hash)))
        }
        #expect(verifier.finish(head: head) == .verified(records: 50, head: head))
    }

    // MARK: Tampering

    enum Field: String, CaseIterable, Sendable {
        case time, principal, tenant, operation, keyIDs, outcome, requestID, detail, previousHash, hash
    }

    static func edit(_ record: inout AuditRecord, _ field: Field) {
        switch field {
        case .time: record.event.time.millisecondsSinceEpoch += 1
        case .principal: record.event.principal = Principal("mallory")
        case .tenant: record.event.tenant = record.event.tenant == nil ? TenantID(trusted: "tenant-0") : nil
        case .operation:
            record.event.operation = record.event.operation == .decryptDataKey ? .encrypt : .decryptDataKey
        case .keyIDs: record.event.keyIDs.append("key-forged")
        case .outcome: record.event.outcome = record.event.outcome == .success ? .failure("denied") : .success
        case .requestID: record.event.requestID += "x"
        case .detail: record.event.detail += " forged"
        case .previousHash: record.previousHash[0] ^= 1
        case .hash: record.hash[31] ^= 1
        }
    }

    @Test("editing one field of record k breaks the chain at k", arguments: Field.allCases, [1, 17, 50])
    func editedField(field: Field, k: Int) {
        var (records, head) = Self.chain()
        let original = records[k - 1]
        Self.edit(&records[k - 1], field)
        #expect(records[k - 1] != original)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .edited)
        #expect(problem?.sequence == Int64(k))
    }

    @Test("editing a record and fixing its own hash is caught at the next record or at the head")
    func editedAndRehashed() {
        var (records, head) = Self.chain()
        records[24].event.detail = "forged"
        records[24].hash = AuditChain.hash(
            sequence: 25, event: records[24].event, previousHash: records[24].previousHash)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .inserted)
        #expect(problem?.sequence == 26)

        var last = Self.chain()
        last.records[49].event.detail = "forged"
        last.records[49].hash = AuditChain.hash(
            sequence: 50, event: last.records[49].event, previousHash: last.records[49].previousHash)
        let atHead = Self.broken(AuditChain.verify(last.records, head: last.head))
        #expect(atHead?.kind == .headMismatch)
        #expect(atHead?.sequence == 50)
    }

    @Test("rewriting the whole tail after an edit is caught by the head", arguments: [1, 25, 49])
    func rewrittenTail(k: Int) {
        let (records, head) = Self.chain()
        var events = records.map(\.event)
        events[k - 1].principal = Principal("mallory")
        let forged = AuditChain.link(events, after: .genesis)
        let problem = Self.broken(AuditChain.verify(forged.records, head: head))
        #expect(problem?.kind == .headMismatch)
        #expect(problem?.sequence == 50)
    }

    @Test("deleting record k in the middle: record k+1 reports it missing", arguments: [1, 2, 25, 49])
    func deletedMiddle(k: Int) {
        var (records, head) = Self.chain()
        records.remove(at: k - 1)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .missing)
        #expect(problem?.sequence == Int64(k + 1))
    }

    @Test("deleting records from the end is caught by the head", arguments: [1, 3, 50])
    func deletedAtEnd(dropped: Int) {
        let (records, head) = Self.chain()
        let kept = Array(records.dropLast(dropped))
        let problem = Self.broken(AuditChain.verify(kept, head: head))
        #expect(problem?.kind == .missing)
        #expect(problem?.sequence == Int64(50 - dropped + 1))
    }

    @Test(
        "a forged record with a correct hash but a fake previous hash is caught where it stands",
        arguments: [1, 20, 50])
    func insertedForgery(k: Int) {
        var (records, head) = Self.chain()
        var event = records[k - 1].event
        event.detail = "forged"
        let fakePrevious = [UInt8](repeating: 0xEE, count: 32)
        let forged = AuditRecord(
            sequence: Int64(k),
            event: event,
            previousHash: fakePrevious,
            hash: AuditChain.hash(sequence: Int64(k), event: event, previousHash: fakePrevious)
        )
        records.insert(forged, at: k - 1)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .inserted)
        #expect(problem?.sequence == Int64(k))
    }

    @Test("a replaced record with a fake previous hash is caught where it stands")
    func replacedForgery() {
        var (records, head) = Self.chain()
        let fakePrevious = [UInt8](repeating: 0xEE, count: 32)
        records[19].previousHash = fakePrevious
        records[19].hash = AuditChain.hash(sequence: 20, event: records[19].event, previousHash: fakePrevious)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .inserted)
        #expect(problem?.sequence == 20)
    }

    @Test("a well-linked forged record inserted before record k is caught at the original k")
    func insertedLinkedForgery() {
        var (records, head) = Self.chain()
        var event = records[19].event
        event.detail = "forged"
        let forged = AuditRecord(
            sequence: 20,
            event: event,
            previousHash: records[18].hash,
            hash: AuditChain.hash(sequence: 20, event: event, previousHash: records[18].hash)
        )
        records.insert(forged, at: 19)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .outOfOrder)
        #expect(problem?.sequence == 20)
    }

    @Test("a replayed (duplicated) record is out of order")
    func duplicated() {
        var (records, head) = Self.chain()
        records.insert(records[9], at: 10)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .outOfOrder)
        #expect(problem?.sequence == 10)
    }

    /// Swapping records i and j (i < j) puts record j first: the chain breaks right there, at the
    /// first swapped position, where record j jumps over i..j-1.
    @Test(
        "swapping two records breaks the chain at the first swapped position",
        arguments: [(10, 11), (10, 30), (1, 2), (49, 50)] as [(Int, Int)]
    )
    func swapped(i: Int, j: Int) {
        var (records, head) = Self.chain()
        records.swapAt(i - 1, j - 1)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.sequence == Int64(j))
        #expect(problem?.kind == .missing)
    }

    @Test("exchanging the sequence numbers of two records is an edit")
    func swappedSequenceNumbers() {
        var (records, head) = Self.chain()
        records[9].sequence = 11
        records[10].sequence = 10
        records.swapAt(9, 10)
        let problem = Self.broken(AuditChain.verify(records, head: head))
        #expect(problem?.kind == .edited)
        #expect(problem?.sequence == 10)
    }

    @Test("a head with the right sequence and another hash does not match")
    func headWrongHash() {
        let (records, head) = Self.chain()
        var wrong = head.hash
        wrong[0] ^= 0x80
        let problem = Self.broken(AuditChain.verify(records, head: AuditHead(sequence: 50, hash: wrong)))
        #expect(problem?.kind == .headMismatch)
        #expect(problem?.sequence == 50)
    }

    @Test("a head behind the last record does not match")
    func headBehind() {
        let (records, _) = Self.chain()
        let problem = Self.broken(AuditChain.verify(records, head: AuditHead(sequence: 49, hash: records[48].hash)))
        #expect(problem?.kind == .headMismatch)
        #expect(problem?.sequence == 50)
    }

    @Test("a genesis head against a non-empty log does not match")
    func headGenesis() {
        let (records, _) = Self.chain(3)
        let problem = Self.broken(AuditChain.verify(records, head: .genesis))
        #expect(problem?.kind == .headMismatch)
    }

    @Test("problem kinds have stable names")
    func kindNames() {
        #expect(AuditProblem.Kind.outOfOrder.rawValue == "out-of-order")
        #expect(AuditProblem.Kind.headMismatch.rawValue == "head-mismatch")
        let problem = AuditProblem(sequence: 3, kind: .edited, explanation: "why")
        #expect(problem.description == "why")
    }

    // MARK: Canonical encoding

    static func event(
        principal: String = "p",
        tenant: TenantID? = nil,
        keyIDs: [String] = [],
        outcome: AuditOutcome = .success,
        requestID: String = "r",
        detail: String = ""
    ) -> AuditEvent {
        AuditEvent(
            time: Timestamp(millisecondsSinceEpoch: 2),
            principal: Principal(principal),
            tenant: tenant,
            operation: .encrypt,
            keyIDs: keyIDs,
            outcome: outcome,
            requestID: requestID,
            detail: detail
        )
    }

    @Test("canonical encoding, byte by byte")
    func canonicalKnownAnswer() {
        let event = Self.event(tenant: TenantID(trusted: "t"), keyIDs: ["k"])
        func string(_ value: String) -> [UInt8] { [0, 0, 0, UInt8(value.utf8.count)] + Array(value.utf8) }
        var expected = string("hsmgw-audit-v1")
        expected += [0, 0, 0, 0, 0, 0, 0, 1]  // sequence
        expected += [0, 0, 0, 0, 0, 0, 0, 2]  // time
        expected += string("p") + string("t") + string("encrypt")
        expected += [0, 0, 0, 1] + string("k")
        expected += string("ok") + string("r") + string("")
        #expect(AuditChain.canonicalEncoding(sequence: 1, event: event) == expected)
    }

    static let ambiguousPairs: [(AuditEvent, AuditEvent)] = [
        (event(keyIDs: ["a,b"]), event(keyIDs: ["a", "b"])),
        (event(keyIDs: ["ab"]), event(keyIDs: ["a", "b"])),
        (event(keyIDs: ["a"]), event(keyIDs: ["a", ""])),
        (event(keyIDs: []), event(keyIDs: [""])),
        (event(principal: "ab", requestID: ""), event(principal: "a", requestID: "b")),
        (event(requestID: "rx", detail: ""), event(requestID: "r", detail: "x")),
        (event(tenant: nil), event(tenant: TenantID(trusted: "t"))),
        (event(outcome: .success), event(outcome: .failure("ok"))),
        (event(outcome: .failure("a")), event(outcome: .failure("b"))),
    ]

    @Test("the canonical encoding is unambiguous", arguments: ambiguousPairs)
    func unambiguous(lhs: AuditEvent, rhs: AuditEvent) {
        #expect(
            AuditChain.canonicalEncoding(sequence: 1, event: lhs)
                != AuditChain.canonicalEncoding(sequence: 1, event: rhs))
        #expect(
            AuditChain.hash(sequence: 1, event: lhs, previousHash: AuditHead.genesis.hash)
                != AuditChain.hash(sequence: 1, event: rhs, previousHash: AuditHead.genesis.hash))
    }

    @Test("the sequence and the previous hash are part of the hash")
    func hashInputs() {
        let event = Self.event()
        let base = AuditChain.hash(sequence: 1, event: event, previousHash: AuditHead.genesis.hash)
        #expect(AuditChain.hash(sequence: 2, event: event, previousHash: AuditHead.genesis.hash) != base)
        #expect(AuditChain.hash(sequence: 1, event: event, previousHash: [UInt8](repeating: 1, count: 32)) != base)
    }

    // MARK: Events and outcomes

    @Test(
        "AuditOutcome round-trips through its stored form",
        arguments: [
            (AuditOutcome.success, "ok"),
            (AuditOutcome.failure("not found"), "error:not found"),
            (AuditOutcome.failure(""), "error:"),
            (AuditOutcome.failure("ok"), "error:ok"),
            (AuditOutcome.failure("error:x"), "error:error:x"),
        ] as [(AuditOutcome, String)]
    )
    func outcomeRoundTrip(outcome: AuditOutcome, stored: String) {
        #expect(outcome.description == stored)
        #expect(AuditOutcome(stored: stored) == outcome)
        #expect(AuditOutcome(stored: outcome.description) == outcome)
    }

    @Test("an unknown stored outcome reads as a failure")
    func outcomeUnknown() {
        #expect(AuditOutcome(stored: "garbage") == .failure("garbage"))
        #expect(AuditOutcome(stored: "OK") == .failure("OK"))
    }

    @Test("AuditEvent caps key ids at 1000 and detail at 1024 bytes")
    func eventLimits() {
        let ids = (0..<1500).map { "id-\($0)" }
        let event = Self.event(keyIDs: ids, detail: String(repeating: "d", count: 3000))
        #expect(event.keyIDs == Array(ids.prefix(1000)))
        #expect(event.detail == String(repeating: "d", count: 1024))
        let short = Self.event(keyIDs: ["a"], detail: "x")
        #expect(short.keyIDs == ["a"])
        #expect(short.detail == "x")
    }

    @Test("AuditEvent detail truncation inside a multi-byte character keeps the whole characters before it")
    func eventDetailTruncatedInsideCharacter() {
        let detail = "d" + String(repeating: "\u{e9}", count: 600)  // byte 1024 splits an é
        let event = Self.event(detail: detail)
        #expect(event.detail == "d" + String(repeating: "\u{e9}", count: 511))
    }
}
