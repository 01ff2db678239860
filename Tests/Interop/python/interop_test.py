"""Interoperability test: the Python client (written from docs/protocol.md) against a live gateway.

Usage:
    interop_test.py [ADDRESS [TOKEN_FILE]]
    ADDRESS     host:port of the gateway (or $HSMGW_ADDRESS)
    TOKEN_FILE  file holding an API token of a gateway admin on one line (or $HSMGW_TOKEN_FILE)
    $HSMGW_CA_FILE      use TLS and verify the server against this CA (plaintext without it)
    $HSMGW_SERVER_NAME  the name to verify in the server certificate (default: the host)

Prints one line per check and a closing "N passed, N failed"; exits 1 on any failure, 2 on bad
usage. The token and data-key plaintext are never printed.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
import traceback
import uuid

import hsmgw_client as hc
from hsmgw_client import Code, pb

UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A method number no version 1 server defines (section 9.1).
UNKNOWN_METHOD = 9999


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print("ok     %s" % what)
        else:
            self.failed += 1
            print("FAILED %s%s" % (what, ": " + detail if detail else ""))
        return ok

    def expect_error(self, what: str, call, code: int, reason: str = "") -> None:
        """Runs `call`, which must fail with `code` (and `reason` when given)."""
        try:
            call()
        except hc.GatewayError as error:
            got = (error.code, error.reason) if reason else (error.code,)
            want = (code, reason) if reason else (code,)
            self.check(
                what,
                got == want and error.status_payload_code == error.code,
                "got %s (Status.code %d)" % (error, error.status_payload_code),
            )
            return
        self.check(what, False, "the call succeeded")


def run(address: str, token: str, ca_file: str, server_name: str, checks: Checks) -> None:
    check = checks.check
    check("the token file holds an API token of the documented shape", hc.is_api_token(token))

    with hc.Client.connect_address(address, ca_file=ca_file or None, server_hostname=server_name or None) as client:
        # Before the handshake: any method but Hello is refused, the connection stays usable.
        checks.expect_error(
            "ServerInfo before Hello -> UNAUTHENTICATED HANDSHAKE_REQUIRED",
            lambda: client.call("ServerInfo", pb.ServerInfoRequest(), deadline_ms=5000),
            Code.UNAUTHENTICATED,
            "HANDSHAKE_REQUIRED",
        )

        hello = client.hello(token, "hsmgw-python-interop/1")
        check("Hello -> OK with a principal", bool(hello.principal), repr(hello.principal))
        check(
            "Hello announces limits (frame >= 1 KiB, in flight >= 1, keepalive > 0)",
            hello.max_frame_bytes >= 1024 and hello.max_requests_in_flight >= 1 and hello.keepalive_seconds > 0,
            "%d, %d, %d" % (hello.max_frame_bytes, hello.max_requests_in_flight, hello.keepalive_seconds),
        )
        check(
            "Hello lists the admin binding on '*'",
            any(r.tenant == "*" and r.role == "admin" for r in hello.roles),
            str([(r.tenant, r.role) for r in hello.roles]),
        )

        info = client.call("ServerInfo", pb.ServerInfoRequest(), deadline_ms=5000)
        check(
            "ServerInfo -> OK, same principal and instance as Hello",
            bool(info.server_version) and info.principal == hello.principal and info.instance_id == hello.instance_id,
            "version %r principal %r instance %r" % (info.server_version, info.principal, info.instance_id),
        )
        check("ServerInfo names its store (sqlite or postgres)", info.store in ("sqlite", "postgres"), info.store)

        tenant = "interop-" + uuid.uuid4().hex[:12]
        created = client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant), deadline_ms=60000).tenant
        check(
            "CreateTenant %s -> enabled, master-key version >= 1" % tenant,
            created.id == tenant and created.state == "enabled" and created.primary_master_key_version >= 1,
            "id %r state %r version %d" % (created.id, created.state, created.primary_master_key_version),
        )

        context = {"purpose": "interop", "run": tenant}
        generated = client.call(
            "GenerateDataKey",
            pb.GenerateDataKeyRequest(tenant=tenant, encryption_context=context, include_plaintext=True),
            deadline_ms=30000,
        ).key
        check(
            "GenerateDataKey -> lowercase UUID id, 32-byte plaintext, 83-byte wrapped copy, primary version",
            bool(UUID_TEXT.match(generated.id))
            and len(generated.plaintext) == 32
            and len(generated.wrapped) == 83
            and generated.master_key_version == created.primary_master_key_version,
            "id %r, plaintext %d bytes, wrapped %d bytes, version %d"
            % (generated.id, len(generated.plaintext), len(generated.wrapped), generated.master_key_version),
        )

        same_context_other_order = dict(reversed(list(context.items())))
        decrypted = client.call(
            "DecryptDataKey",
            pb.DecryptDataKeyRequest(tenant=tenant, id=generated.id, encryption_context=same_context_other_order),
            deadline_ms=30000,
        ).key
        check(
            "DecryptDataKey with the same context (other map order) -> the same 32-byte key",
            decrypted.id == generated.id and decrypted.plaintext == generated.plaintext,
            "id %r, plaintext equal: %s" % (decrypted.id, decrypted.plaintext == generated.plaintext),
        )

        check(
            "DecryptDataKey returns the current wrapped copy (section 9.3)",
            decrypted.wrapped == generated.wrapped,
            "wrapped %d bytes, equal: %s" % (len(decrypted.wrapped), decrypted.wrapped == generated.wrapped),
        )

        before = client.call("GetDataKey", pb.GetDataKeyRequest(tenant=tenant, id=generated.id), deadline_ms=10000).key
        time.sleep(0.01)
        rewrapped = client.call(
            "RewrapDataKey",
            pb.RewrapDataKeyRequest(tenant=tenant, id=generated.id, encryption_context=context),
            deadline_ms=30000,
        ).key
        again = client.call(
            "DecryptDataKey",
            pb.DecryptDataKeyRequest(tenant=tenant, id=generated.id, encryption_context=context),
            deadline_ms=30000,
        ).key
        check(
            "RewrapDataKey of a key under the primary leaves it as it is (same metadata, same wrapped copy)",
            rewrapped == before and again.wrapped == generated.wrapped,
            "updated_at %d -> %d, wrapped equal: %s" % (before.updated_at_ms, rewrapped.updated_at_ms, again.wrapped == generated.wrapped),
        )

        checks.expect_error(
            "DecryptDataKey with another context -> INVALID_ARGUMENT DECRYPTION_FAILED",
            lambda: client.call(
                "DecryptDataKey",
                pb.DecryptDataKeyRequest(
                    tenant=tenant, id=generated.id, encryption_context={"purpose": "interop", "run": "other"}
                ),
                deadline_ms=30000,
            ),
            Code.INVALID_ARGUMENT,
            "DECRYPTION_FAILED",
        )

        request_id = client.start(UNKNOWN_METHOD, b"", deadline_ms=5000)
        frame = client.wait(request_id)
        check(
            "unknown method %d -> UNIMPLEMENTED, method number echoed" % UNKNOWN_METHOD,
            frame.status == Code.UNIMPLEMENTED and frame.method == UNKNOWN_METHOD,
            "status %s, method %d" % (hc.code_name(frame.status), frame.method),
        )

        # Several requests in flight at once, each answered under its own id.
        first = client.start("GetTenant", pb.GetTenantRequest(tenant=tenant), deadline_ms=10000)
        second = client.start("ServerInfo", pb.ServerInfoRequest(), deadline_ms=10000)
        got_second = client.result(second)
        got_first = client.result(first)
        check(
            "two requests in flight -> both answered, matched by request id",
            got_first.tenant.id == tenant and got_second.principal == hello.principal,
            "GetTenant %r, ServerInfo principal %r" % (got_first.tenant.id, got_second.principal),
        )

        # Section 16: what this client computes from the document matches what the gateway made.
        records, after = [], 0
        while True:
            page = client.call("ListAuditRecords", pb.ListAuditRecordsRequest(after=after, limit=1000), deadline_ms=30000)
            records += page.records
            if len(page.records) < 1000:
                break
            after = page.records[-1].sequence
        expected_hash = "context-sha256=" + hc.context_hash(context).hex()
        generate_records = [r for r in records if r.operation == "data-key.generate" and generated.id in r.key_ids]
        check(
            "the context hash computed as section 16.1 says is the one the gateway audited",
            len(generate_records) == 1 and expected_hash in generate_records[0].detail.split(" "),
            "%d records; %r" % (len(generate_records), generate_records[0].detail if generate_records else ""),
        )
        previous, broken = bytes(32), []
        for record in records:
            if record.previous_hash != previous or hc.audit_record_hash(record, previous) != record.hash:
                broken.append(record.sequence)
            previous = record.hash
        check(
            "every listed audit record re-hashes as section 16.4 says and links to the one before (%d records)"
            % len(records),
            bool(records) and records[0].sequence == 1 and not broken,
            "first sequence %s, broken at %s" % (records[0].sequence if records else None, broken[:5]),
        )
        check(
            "audit outcomes read ok or error:<code>",
            all(r.outcome == "ok" or r.outcome.startswith("error:") for r in records),
            str(sorted({r.outcome for r in records})),
        )

        payload = os.urandom(16)
        check("ping -> pong with the same payload", client.ping(payload) == payload)
        check("the connection is still open after errors", client.goaway is None, str(client.goaway))

    # Section 3.2: a goaway carries its code in the header as well as in its Status.
    with hc.Client.connect_address(address, ca_file=ca_file or None, server_hostname=server_name or None) as raw:
        raw.send_raw(struct.pack(">IBBHHHII", 16, 1, 1, 1, 2, 0, 9, 0))  # flags 1: reserved
        raw.poll(5.0)
        goaway = raw.goaway
        check(
            "reserved flags -> goaway whose header status and Status.code are INVALID_ARGUMENT, RESERVED_FLAGS",
            goaway is not None
            and goaway.code == Code.INVALID_ARGUMENT
            and goaway.status_payload_code == Code.INVALID_ARGUMENT
            and goaway.reason == "RESERVED_FLAGS",
            "no goaway" if goaway is None else "header %s, Status.code %d, reason %s"
            % (goaway.code_name, goaway.status_payload_code, goaway.reason),
        )


def main(argv) -> int:
    args = argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    address = args[0] if len(args) > 0 else os.environ.get("HSMGW_ADDRESS", "")
    token_file = args[1] if len(args) > 1 else os.environ.get("HSMGW_TOKEN_FILE", "")
    if not address or not token_file or len(args) > 2:
        print("usage: interop_test.py [ADDRESS [TOKEN_FILE]] (or HSMGW_ADDRESS, HSMGW_TOKEN_FILE)", file=sys.stderr)
        return 2
    with open(token_file, encoding="utf-8") as f:
        token = f.read().strip()

    checks = Checks()
    try:
        run(address, token, os.environ.get("HSMGW_CA_FILE", ""), os.environ.get("HSMGW_SERVER_NAME", ""), checks)
    except Exception as error:  # a step that could not even run counts as a failure
        checks.failed += 1
        print("FAILED the run stopped: %s: %s" % (type(error).__name__, error))
        traceback.print_exc(limit=3)
    print("interop: %d passed, %d failed" % (checks.passed, checks.failed))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
