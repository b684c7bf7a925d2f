import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// `quiesce serve`'s listener: accepts mutual-TLS connections and hands each authenticated one to
/// a blocking handler as a plain socket.
///
/// Only clients presenting a certificate signed by `identity.trustedCA` get through: the server
/// requires a client certificate and verifies its chain (client certificates carry no host name,
/// so none is checked). Each connection whose handshake completed is handed to `handler` on a
/// dedicated `Thread` (never a NIO event loop, never the Swift cooperative pool: the handler does
/// blocking disk I/O) as a connected `AF_UNIX` stream socket whose bytes travel through TLS.
///
/// The handler owns the socket and must close it. Reading EOF from it means the client sent all
/// it will send, or the connection broke (TCP closed without TLS `close_notify` reads as EOF too:
/// the stream format must carry its own end marker); `shutdown(fd, SHUT_WR)` sends EOF to the
/// client and keeps the socket readable; `close` ends the connection after the bytes already
/// written have gone out.
///
/// Under TLS 1.3 a client checks the server's certificate name after its side of the handshake:
/// a client with a valid certificate that then refuses the server's name may reach the handler
/// and hang up at once (the handler reads EOF). A client without a valid certificate never does.
public final class TLSPipeServer: Sendable {
    /// The port the server listens on (the one chosen by the system when started with port 0).
    public let port: Int
    private let group: MultiThreadedEventLoopGroup
    private let channel: Channel
    private let gate = ShutdownGate()

    private init(port: Int, group: MultiThreadedEventLoopGroup, channel: Channel) {
        self.port = port
        self.group = group
        self.channel = channel
    }

    /// Starts listening on `host`:`port` (port 0: any free port, see `port`).
    ///
    /// - Parameters:
    ///   - handshakeTimeout: seconds a connection may take to complete its handshake before it is dropped.
    ///   - onRefused: told about each connection dropped before its handshake completed (no or an
    ///     untrusted client certificate, a client that does not trust this server, a timeout), on
    ///     the event loop: it must return at once (log and return).
    ///   - handler: gets each authenticated connection's socket and its peer (address and the
    ///     certificate's common name), on a thread of its own; it must close the socket.
    /// - Throws: `TLSPipeError.unusableIdentity` when a PEM file cannot be used,
    ///   `TLSPipeError.cannotListen` when the address cannot be bound.
    public static func start(
        host: String, port: Int, identity: TLSIdentity,
        handshakeTimeout: Double = 30,
        onRefused: (@Sendable (_ peer: String, _ reason: TLSPipeError) -> Void)? = nil,
        handler: @escaping @Sendable (_ fd: Int32, _ peer: TLSPeer) -> Void
    ) throws(TLSPipeError) -> TLSPipeServer {
        let loaded = try LoadedIdentity(trustedCA: identity.trustedCA, certificate: identity.certificate,
                                        privateKey: identity.privateKey)
        let sslContext = try loaded.context(server: true)
        let trustedCA = identity.trustedCA
        let handshakeTime = TimeAmount.nanoseconds(Int64(handshakeTimeout * 1e9))

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // A sender that vanished without closing (power loss, a partition) would otherwise
            // hold its volume's receive lock forever: probe after 60 s idle, drop after 6 × 10 s.
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            .childChannelOption(.tcpOption(TCP_KEEPIDLE), value: 60)
            .childChannelOption(.tcpOption(TCP_KEEPINTVL), value: 10)
            .childChannelOption(.tcpOption(TCP_KEEPCNT), value: 6)
            .childChannelInitializer { channel in
                let peerAddress = channel.remoteAddress.map(describeAddress) ?? "unknown peer"
                let established = channel.eventLoop.makePromise(of: EstablishedPipe.self)
                established.futureResult.whenComplete { result in
                    switch result {
                    case .success(let pipe):
                        Thread.detachNewThread {
                            // Linux keeps 15 bytes of a thread's name.
                            Thread.current.name = "quiesce-serve"
                            handler(pipe.socket, pipe.peer)
                        }
                    case .failure(let error):
                        onRefused?(peerAddress, .serverHandshake(error, peer: peerAddress, trustedCA: trustedCA))
                    }
                }
                return channel.eventLoop.makeCompletedFuture { () throws -> CInt in
                    let sockets = try makeSocketPair()
                    do {
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(DrainBeforeClose())
                        try sync.addHandler(NIOSSLServerHandler(context: sslContext))
                        try sync.addHandler(HandshakeHandler(callerSocket: sockets.caller,
                                                             deadline: .now() + handshakeTime,
                                                             outcome: established))
                    } catch {
                        _ = close(sockets.caller)
                        _ = close(sockets.nio)
                        established.fail(error)
                        throw error
                    }
                    return sockets.nio
                }.flatMapError { error in
                    established.fail(error)
                    return channel.eventLoop.makeFailedFuture(error)
                }.flatMap { nioSocket in
                    gluePipe(over: nioSocket, to: channel).map { _ in () }
                }
            }

        let channel: Channel
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            let reason = (error as? IOError).map { String(cString: strerror($0.errnoCode)) } ?? "\(error)"
            throw .cannotListen(address: "\(host):\(port)", reason: reason)
        }
        return TLSPipeServer(port: channel.localAddress?.port ?? port, group: group, channel: channel)
    }

    /// Blocks until the server has shut down (see `shutdown`), or its listening socket failed.
    public func wait() {
        try? self.channel.closeFuture.wait()
        self.shutdown()
    }

    /// Stops listening, closes every connection (handlers then read EOF or get an error on their
    /// sockets; they are not waited for) and stops the event loop. Idempotent; returns once done:
    /// at once when no client is connected, after up to 5 s while a client has not closed its end
    /// (the wait for its TLS close_notify), up to 30 s when one stopped reading bytes still owed to it.
    /// Must not be called from a NIO event loop.
    public func shutdown() {
        self.gate.runOnce {
            try? self.channel.close().wait()
            try? self.group.syncShutdownGracefully()
        }
    }
}

/// Runs a shutdown once; later callers wait for it to finish.
private final class ShutdownGate: @unchecked Sendable {
    private let condition = NSCondition()
    private var state = State.running
    private enum State { case running, stopping, stopped }

    func runOnce(_ body: () -> Void) {
        self.condition.lock()
        guard self.state == .running else {
            while self.state != .stopped { self.condition.wait() }
            self.condition.unlock()
            return
        }
        self.state = .stopping
        self.condition.unlock()
        body()
        self.condition.lock()
        self.state = .stopped
        self.condition.broadcast()
        self.condition.unlock()
    }
}

/// "10.0.0.7:40122", "[fd00::7]:40122".
func describeAddress(_ address: SocketAddress) -> String {
    guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
    return address.protocol == .inet6 ? "[\(ip)]:\(port)" : "\(ip):\(port)"
}

extension ChannelOption where Self == ChannelOptions.Types.SocketOption {
    /// An `IPPROTO_TCP` level option (NIO names only `TCP_NODELAY`).
    static func tcpOption(_ name: Int32) -> Self {
        ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: name))
    }
}
