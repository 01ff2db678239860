import GatewayWire
import NIOCore

// The seam between the transport (connections, frames, limits) and the gateway's logic
// (authentication, authorisation, the key service). The transport decodes frames, enforces the
// connection-level rules of docs/protocol.md and calls a `GatewayRequestHandler`; it never looks
// inside a payload.

/// What the transport knows about one connection.
public struct ConnectionInfo: Sendable, Hashable {
    /// Unique within this server process; appears in logs.
    public var id: UInt64
    /// The peer's address as text (`127.0.0.1:54321`, `[::1]:54321`, or `unix`).
    public var remoteAddress: String
    /// Whether the connection runs over TLS.
    public var isTLS: Bool
    /// The subject common name of the client certificate, when the peer presented one that the
    /// configured client CA verified (mTLS); nil otherwise.
    public var clientCertificateCommonName: String?

    public init(id: UInt64, remoteAddress: String, isTLS: Bool, clientCertificateCommonName: String? = nil) {
        self.id = id
        self.remoteAddress = remoteAddress
        self.isTLS = isTLS
        self.clientCertificateCommonName = clientCertificateCommonName
    }
}

/// Who a connection acts as after a successful handshake.
public struct AuthenticatedPeer: Sendable, Hashable {
    /// The principal's name.
    public var principal: String
    /// The API token's id (not the token) when the handshake used one; nil for a certificate.
    public var apiTokenID: String?
    /// The client's self-declared name, for logs only.
    public var clientName: String

    public init(principal: String, apiTokenID: String?, clientName: String) {
        self.principal = principal
        self.apiTokenID = apiTokenID
        self.clientName = clientName
    }
}

/// One request, as the transport hands it over.
public struct IncomingRequest: Sendable {
    public var method: Method
    public var requestID: UInt32
    /// The request message's bytes (not yet decoded).
    public var payload: ByteBuffer
    /// When the caller stops waiting; nil when the request carried no deadline.
    public var deadline: NIODeadline?
    public var connection: ConnectionInfo

    public init(
        method: Method,
        requestID: UInt32,
        payload: ByteBuffer,
        deadline: NIODeadline?,
        connection: ConnectionInfo
    ) {
        self.method = method
        self.requestID = requestID
        self.payload = payload
        self.deadline = deadline
        self.connection = connection
    }
}

/// One response: OK with the method's response message, or another status with a `Status`
/// message.
public struct OutgoingResponse: Sendable {
    public var status: StatusCode
    public var payload: ByteBuffer

    public init(status: StatusCode, payload: ByteBuffer) {
        self.status = status
        self.payload = payload
    }
}

/// The handshake's result.
public enum HelloOutcome: Sendable {
    /// The connection now acts as `peer`; `response` (status OK, a `HelloResponse`) is sent.
    case accepted(AuthenticatedPeer, response: OutgoingResponse)
    /// `response` (UNAUTHENTICATED, INVALID_ARGUMENT...) is sent and the connection is closed.
    case refused(OutgoingResponse)
}

/// The gateway's logic, as the transport sees it.
public protocol GatewayRequestHandler: Sendable {
    /// The first request of a connection (method `Hello`).
    func hello(_ request: IncomingRequest) async -> HelloOutcome

    /// Every other request on an authenticated connection, including method numbers this build
    /// does not know (the handler answers those `UNIMPLEMENTED`). Runs in its own task, which the
    /// transport cancels when the caller cancels, the deadline passes or the connection closes;
    /// by then the transport has already answered the caller, so the result is dropped.
    func handle(_ request: IncomingRequest, peer: AuthenticatedPeer) async -> OutgoingResponse
}
