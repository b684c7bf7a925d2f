#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import NIOCore
import NIOPosix
import NIOSSL

/// A sender's end of the mutual-TLS pipe to `quiesce serve`.
public enum TLSPipeClient {
    /// Connects to `host`:`port` with mutual TLS and returns a connected, blocking `AF_UNIX` stream
    /// socket whose bytes travel through the TLS connection. The caller owns it and closes it.
    ///
    /// Returns once the handshake completed: the server's certificate is signed by
    /// `identity.trustedCA` and valid for `serverName` (default `host`; an IP address is checked
    /// against the certificate's IP subjectAltNames; note that swift-nio-ssl also accepts a
    /// certificate whose IP subjectAltName is the connected address, whatever `serverName` says).
    /// Under TLS 1.3 the server checks this client's
    /// certificate after the client's side of the handshake is done: a refused client reads EOF
    /// (or gets an error) on its first read instead of an error here.
    ///
    /// EOF read from the socket means the server sent all it will send, or the connection broke
    /// (the stream format must carry its own end marker); `shutdown(fd, SHUT_WR)` sends EOF to the
    /// server and keeps the socket readable; `close` ends the connection after the bytes already
    /// written have gone out. SIGPIPE is ignored process-wide once NIO runs (Linux), so a write to
    /// a connection that is gone fails with EPIPE. Each connection runs its own one-thread event loop,
    /// stopped when both the TLS connection and the socket are closed.
    ///
    /// - Parameter timeout: seconds for resolving, connecting and the handshake together.
    /// - Throws: `TLSPipeError`, naming `host:port`, the cause and the fix.
    public static func connect(
        host: String, port: Int, identity: TLSIdentity, serverName: String? = nil, timeout: Double = 10
    ) throws(TLSPipeError) -> Int32 {
        try connect(host: host, port: port, trustedCA: identity.trustedCA,
                    certificate: identity.certificate, privateKey: identity.privateKey,
                    serverName: serverName, timeout: timeout)
    }

    /// `connect`, with the client certificate optional (tests: a client that presents none).
    static func connect(
        host: String, port: Int, trustedCA: String, certificate: String?, privateKey: String?,
        serverName: String? = nil, timeout: Double = 10
    ) throws(TLSPipeError) -> Int32 {
        let address = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        let loaded = try LoadedIdentity(trustedCA: trustedCA, certificate: certificate, privateKey: privateKey)
        let sslContext = try loaded.context(server: false)
        let expectedName = serverName ?? host
        // SNI carries host names only; an IP address is verified against the connected address.
        let sniName: String? = isIPAddress(expectedName) ? nil : expectedName
        let deadline = NIODeadline.now() + .nanoseconds(Int64(timeout * 1e9))

        let targets = try resolve(host: host, port: port, address: address)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var lastConnectError: Error?
        for target in targets {
            let remaining = deadline - .now()
            guard remaining > .zero else { break }
            let attempt = Attempt(loop: group.next())
            let channel: Channel
            do {
                channel = try attempt.bootstrap(sslContext: sslContext, serverName: sniName, deadline: deadline,
                                                connectTimeout: remaining)
                    .connect(to: target).wait()
            } catch {
                attempt.abandon(error)
                lastConnectError = error
                continue
            }
            do {
                let established = try attempt.established.futureResult.wait()
                // The event loop lives until both the TLS connection and the caller's socket are done.
                attempt.finished.futureResult.whenComplete { _ in
                    group.shutdownGracefully(queue: .global()) { _ in }
                }
                return established.socket
            } catch {
                attempt.abandon(error)
                try? channel.closeFuture.wait()
                try? group.syncShutdownGracefully()
                if error is HandshakeTimedOut { throw .timedOut(address: address, seconds: timeout) }
                if error is ClosedBeforeHandshake {
                    throw .handshakeFailed(address: address, reason: "the connection closed before the handshake finished",
                                           fix: "check the server's log, and that the port is `quiesce serve`'s")
                }
                throw .clientHandshake(error, address: address, serverName: expectedName, trustedCA: trustedCA)
            }
        }
        try? group.syncShutdownGracefully()
        guard let lastConnectError else { throw .timedOut(address: address, seconds: timeout) }
        throw .connect(lastConnectError, address: address, timeout: timeout)
    }

    /// One connection attempt to one resolved address; every promise is settled on every path.
    private struct Attempt {
        /// The caller's socket, once the handshake completed.
        let established: EventLoopPromise<EstablishedPipe>
        /// Both the TLS channel and the pipe channel are closed.
        let finished: EventLoopPromise<Void>

        init(loop: EventLoop) {
            self.established = loop.makePromise()
            self.finished = loop.makePromise()
        }

        func bootstrap(sslContext: NIOSSLContext, serverName: String?, deadline: NIODeadline,
                       connectTimeout: TimeAmount) -> ClientBootstrap {
            let established = self.established
            let finished = self.finished
            return ClientBootstrap(group: established.futureResult.eventLoop)
                .connectTimeout(connectTimeout)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { () throws -> CInt in
                        let sockets = try makeSocketPair()
                        do {
                            let sync = channel.pipeline.syncOperations
                            try sync.addHandler(DrainBeforeClose())
                            try sync.addHandler(NIOSSLClientHandler(context: sslContext, serverHostname: serverName))
                            try sync.addHandler(HandshakeHandler(callerSocket: sockets.caller, deadline: deadline,
                                                                 outcome: established))
                        } catch {
                            _ = close(sockets.caller)
                            _ = close(sockets.nio)
                            throw error
                        }
                        return sockets.nio
                    }.flatMap { nioSocket in
                        gluePipe(over: nioSocket, to: channel)
                    }.map { pipe in
                        channel.closeFuture.and(pipe.closeFuture).map { _ in () }.cascade(to: finished)
                    }
                }
        }

        /// The attempt failed: settle what is still open (a settled promise ignores this).
        func abandon(_ error: Error) {
            self.established.fail(error)
            self.finished.fail(error)
        }
    }

    private static func isIPAddress(_ name: String) -> Bool {
        (try? SocketAddress(ipAddress: name, port: 0)) != nil
    }

    /// Every address of `host`, in the resolver's order (so "localhost" tries ::1 and 127.0.0.1).
    private static func resolve(host: String, port: Int, address: String) throws(TLSPipeError) -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if os(Linux)
        hints.ai_socktype = CInt(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw .cannotConnect(address: address, reason: "cannot resolve \"\(host)\": \(String(cString: gai_strerror(rc)))",
                                 fix: "check the host name in the target, or use an IP address")
        }
        defer { freeaddrinfo(first) }
        var addresses: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let entry = cursor {
            if let raw = entry.pointee.ai_addr {
                switch entry.pointee.ai_family {
                case AF_INET:
                    addresses.append(raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                        SocketAddress($0.pointee, host: host)
                    })
                case AF_INET6:
                    addresses.append(raw.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                        SocketAddress($0.pointee, host: host)
                    })
                default:
                    break
                }
            }
            cursor = entry.pointee.ai_next
        }
        guard !addresses.isEmpty else {
            throw .cannotConnect(address: address, reason: "\"\(host)\" has no IPv4 or IPv6 address",
                                 fix: "check the host name in the target, or use an IP address")
        }
        return addresses
    }
}
