#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import NIOPosix
import NIOSSL

/// One of a matched pair of handlers that forwards everything its channel reads to the partner's
/// channel (swift-nio's `NIOConnectProxy` glue), here between a TLS connection and a NIO pipe channel
/// over one end of a socketpair.
///
/// - Backpressure: a side reads only while its partner's channel is writable.
/// - Half-closure: EOF read on one side (`ChannelEvent.inputClosed`, both channels run with
///   `allowRemoteHalfClosure`) closes the partner's output once the bytes before it are written:
///   a TLS `close_notify` becomes EOF on the socketpair and the other way round.
/// - Closure: when one side goes away, the partner first writes out what it still holds, then closes.
///
/// Both channels must run on the same event loop: the handlers call each other directly.
final class GlueHandler {
    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    /// The pipe side's socketpair end. A NIO pipe channel closes its output by closing its own
    /// `dup` of the descriptor, which does not send EOF on a socket while the input copy is open:
    /// shut the socket's write side explicitly.
    private let socketToShutDown: CInt?

    private init(socketToShutDown: CInt?) {
        self.socketToShutDown = socketToShutDown
    }

    /// The handler for the TLS channel and the one for the pipe channel over `pipeSocket`.
    static func matchedPair(pipeSocket: CInt) -> (tlsSide: GlueHandler, pipeSide: GlueHandler) {
        let tlsSide = GlueHandler(socketToShutDown: nil)
        let pipeSide = GlueHandler(socketToShutDown: pipeSocket)
        tlsSide.partner = pipeSide
        pipeSide.partner = tlsSide
        return (tlsSide, pipeSide)
    }

    // MARK: Called by the partner, on the shared event loop.

    private func partnerWrite(_ data: NIOAny) {
        self.context?.write(data, promise: nil)
    }

    private func partnerFlush() {
        self.context?.flush()
    }

    /// The partner read EOF: send EOF on this side once everything before it is written.
    private func partnerWriteEOF() {
        self.context?.close(mode: .output, promise: nil)
    }

    /// The partner is gone: write out what this side still holds, then close it.
    private func partnerClosed() {
        guard let context = self.context else { return }
        let outputClosed = context.eventLoop.makePromise(of: Void.self)
        context.close(mode: .output, promise: outputClosed)
        outputClosed.futureResult.assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    private func partnerBecameWritable() {
        if self.pendingRead {
            self.pendingRead = false
            self.context?.read()
        }
    }

    private var partnerWritable: Bool {
        self.context?.channel.isWritable ?? false
    }
}

extension GlueHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // Also reached for a channel that never became active (a failed connect): take the partner down too.
        let partner = self.partner
        self.context = nil
        self.partner = nil
        partner?.partnerClosed()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.partner?.partnerWrite(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner?.partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.partner?.partnerClosed()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case ChannelEvent.inputClosed:
            self.partner?.partnerWriteEOF()
        case ChannelEvent.outputClosed:
            // Our pipe channel has written everything and closed its output copy: EOF for the reader.
            if let socket = self.socketToShutDown {
                _ = shutdown(socket, CInt(SHUT_WR))
            }
        default:
            break
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // An unclean TLS shutdown (EOF without close_notify) is followed by `inputClosed`, which
        // ends this direction only. Anything else ends the connection.
        if let sslError = error as? NIOSSLError, case .uncleanShutdown = sslError {
            return
        }
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.partner?.partnerBecameWritable()
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if let partner = self.partner, partner.partnerWritable {
            context.read()
        } else {
            self.pendingRead = true
        }
    }
}

@available(*, unavailable)
extension GlueHandler: Sendable {}

/// Glues the TLS channel `channel` (on its event loop, from its channel initializer, after the TLS
/// handlers) to a new pipe channel over `pipeSocket`, one end of a socketpair.
///
/// Ownership of `pipeSocket` passes to NIO; on failure it is closed here. The future gives the
/// pipe channel, whose close future ends the last use of the event loop for this connection.
func gluePipe(over pipeSocket: CInt, to channel: Channel) -> EventLoopFuture<Channel> {
    channel.eventLoop.assertInEventLoop()
    let (tlsSide, pipeSide) = GlueHandler.matchedPair(pipeSocket: pipeSocket)
    do {
        try channel.pipeline.syncOperations.addHandler(tlsSide)
    } catch {
        _ = close(pipeSocket)
        return channel.eventLoop.makeFailedFuture(error)
    }
    let boundPipeSide = NIOLoopBound(pipeSide, eventLoop: channel.eventLoop)
    return NIOPipeBootstrap(group: channel.eventLoop)
        .channelOption(.allowRemoteHalfClosure, value: true)
        .channelInitializer { pipe in
            pipe.eventLoop.makeCompletedFuture {
                try pipe.pipeline.syncOperations.addHandlers(DrainBeforeClose(), boundPipeSide.value)
            }
        }
        .takingOwnershipOfDescriptor(inputOutput: pipeSocket)
        .flatMapErrorThrowing { error in
            // NIO did not take the descriptor: it is still ours.
            _ = close(pipeSocket)
            throw error
        }
}

/// A connected `AF_UNIX` stream socketpair, close-on-exec: one end for NIO, one for the blocking caller.
func makeSocketPair() throws -> (nio: CInt, caller: CInt) {
    var fds: [CInt] = [-1, -1]
    #if os(Linux)
    let type = CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue)
    #else
    let type = SOCK_STREAM
    #endif
    guard socketpair(AF_UNIX, type, 0, &fds) == 0 else {
        throw IOError(errnoCode: errno, reason: "socketpair")
    }
    #if !os(Linux)
    _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
    _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
    #endif
    return (fds[0], fds[1])
}

/// First in a channel's pipeline: a close (of the output or the whole channel) waits until the
/// bytes already written have reached the kernel, or `timeout` passed.
///
/// NIO drops pending writes when a channel closes completely, and escalates a half-close to a
/// full close at once when the input is already at EOF. Both happen at the end of every
/// replication session (the sender's EOF arrives before the receiver's last answer is written),
/// so without this the tail of a stream could be lost.
final class DrainBeforeClose: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// How long a close waits for a peer that does not read.
    static let timeout = TimeAmount.seconds(30)

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if case .input = mode {
            context.close(mode: mode, promise: promise)
            return
        }
        // Writes complete in order: an empty write completes once everything before it has gone out.
        let drained = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(self.wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: drained)
        let giveUp = context.eventLoop.assumeIsolated().scheduleTask(in: Self.timeout) {
            drained.fail(ChannelError.outputClosed)
        }
        drained.futureResult.assumeIsolated().whenComplete { _ in
            giveUp.cancel()
            context.close(mode: mode, promise: promise)
        }
    }
}

@available(*, unavailable)
extension DrainBeforeClose: Sendable {}
