#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import NIOSSL
import NIOTLS

/// Who is on the other side of an authenticated connection.
public struct TLSPeer: Sendable, CustomStringConvertible {
    /// "127.0.0.1:40122".
    public var address: String
    /// The common name of the peer's certificate (the CA vouched for it), if it has one.
    public var commonName: String?

    /// "127.0.0.1:40122 (CN=dr-sender)".
    public var description: String { address + (commonName.map { " (CN=\($0))" } ?? "") }
}

/// A connection whose TLS handshake completed: the caller's end of the socketpair and who is on
/// the other side.
struct EstablishedPipe: Sendable {
    var socket: CInt
    var peer: TLSPeer
}

/// The handshake did not finish before its deadline.
struct HandshakeTimedOut: Error {}

/// The connection ended before the handshake finished, with no TLS error to say why.
struct ClosedBeforeHandshake: Error {}

/// Sits after the `NIOSSLHandler` and settles `outcome` once per connection: with the caller's
/// socket when the handshake completed, or with the first error when the connection ended (or the
/// deadline passed) before that. On failure it closes the caller's socket, which nobody else saw.
///
/// On a server, the handshake completes only after the client's certificate was verified, so a
/// client without a valid certificate never gets a socket, under TLS 1.2 and 1.3 alike.
final class HandshakeHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var callerSocket: CInt?
    private let deadline: NIODeadline
    private let outcome: EventLoopPromise<EstablishedPipe>
    private var firstError: Error?
    private var timeout: Scheduled<Void>?

    init(callerSocket: CInt, deadline: NIODeadline, outcome: EventLoopPromise<EstablishedPipe>) {
        self.callerSocket = callerSocket
        self.deadline = deadline
        self.outcome = outcome
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let loop = context.eventLoop.assumeIsolated()
        self.timeout = loop.scheduleTask(deadline: self.deadline) {
            if self.firstError == nil { self.firstError = HandshakeTimedOut() }
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.fail()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event, let socket = self.callerSocket {
            self.callerSocket = nil
            self.timeout?.cancel()
            self.outcome.succeed(EstablishedPipe(socket: socket, peer: Self.describePeer(context)))
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if self.callerSocket != nil, self.firstError == nil {
            self.firstError = error
        }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail()
        context.fireChannelInactive()
    }

    private func fail() {
        self.timeout?.cancel()
        guard let socket = self.callerSocket else { return }
        self.callerSocket = nil
        _ = close(socket)
        self.outcome.fail(self.firstError ?? ClosedBeforeHandshake())
    }

    /// The remote address and, when there is one, the common name of the peer's certificate.
    private static func describePeer(_ context: ChannelHandlerContext) -> TLSPeer {
        var peer = TLSPeer(address: context.channel.remoteAddress.map(describeAddress) ?? "unknown peer")
        if let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate(),
           let name = certificate.subjectName.first(where: { $0.type == .commonName }) {
            peer.commonName = "\(name.value)"
        }
        return peer
    }
}

@available(*, unavailable)
extension HandshakeHandler: Sendable {}
