import Foundation
import QuiesceCore

/// Where a stream's bytes come from: stdin, a pipe from ssh, a socket glued to TLS.
public protocol ByteSource: AnyObject {
    /// Up to `count` bytes; an empty array only at end of stream.
    func read(upTo count: Int) throws -> [UInt8]
}

/// Where a stream's bytes go.
public protocol ByteSink: AnyObject {
    func write(_ bytes: UnsafeRawBufferPointer) throws
}

extension ByteSink {
    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }
}

extension ByteSource {
    /// Exactly `count` bytes, or nil if the stream ended first (truncated).
    public func readExactly(_ count: Int) throws -> [UInt8]? {
        var result: [UInt8] = []
        result.reserveCapacity(count)
        while result.count < count {
            let piece = try read(upTo: count - result.count)
            if piece.isEmpty { return nil }
            result += piece
        }
        return result
    }

    /// One line without its newline (control messages), or nil at end of stream.
    public func readLine(limit: Int = 1 << 20) throws -> String? {
        var bytes: [UInt8] = []
        while true {
            let piece = try read(upTo: 1)
            if piece.isEmpty { return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self) }
            if piece[0] == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(piece[0])
            if bytes.count > limit { throw DeltaStreamError.malformed("a control line longer than \(limit) bytes") }
        }
    }
}

/// A file descriptor as a byte source and sink, with complete writes.
///
/// With an `idleTimeout`, a read or write that makes no progress for that long throws
/// instead of waiting forever on a peer that hangs (a stuck receiver, a silent network):
/// the descriptor is switched to non-blocking mode, so it must be one this process owns
/// (a pipe to a child, a socket), never an inherited stdin/stdout.
public final class FileDescriptorStream: ByteSource, ByteSink {
    public let fd: Int32
    private let what: String
    private let idleTimeout: Duration?
    private var buffer: [UInt8]
    private var start = 0
    private var end = 0

    /// `what` names the peer in errors ("stdin", "ssh dr-host").
    public init(fd: Int32, what: String, idleTimeout: Duration? = nil) {
        self.fd = fd
        self.what = what
        self.idleTimeout = idleTimeout
        self.buffer = [UInt8](repeating: 0, count: 256 << 10)
        if idleTimeout != nil { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }

    public func read(upTo count: Int) throws -> [UInt8] {
        while start == end {
            let n = buffer.withUnsafeMutableBytes { Foundation.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { try awaitReady(POLLIN, doing: "sent nothing"); continue }
                throw DeltaStreamError.transport("reading from \(what): \(String(cString: strerror(errno)))")
            }
            if n == 0 { return [] }
            start = 0
            end = n
        }
        let take = min(count, end - start)
        defer { start += take }
        return Array(buffer[start..<start + take])
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = Foundation.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { try awaitReady(POLLOUT, doing: "took no bytes"); continue }
                let reason = errno == EPIPE ? "the other side closed the connection" : String(cString: strerror(errno))
                throw DeltaStreamError.transport("writing to \(what): \(reason)")
            }
            done += n
        }
    }

    /// Waits until the descriptor can make progress, at most `idleTimeout`.
    private func awaitReady(_ events: Int32, doing stalled: String) throws {
        guard let idleTimeout else { return }
        let deadline = ContinuousClock.now + idleTimeout
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else {
                throw DeltaStreamError.stalled("\(what) \(stalled) for \(formatDuration(idleTimeout)): giving up on it "
                    + "(a hung receiver or a silent network; the target's `timeout` sets how long to wait)")
            }
            var entry = pollfd(fd: fd, events: Int16(events), revents: 0)
            let ready = poll(&entry, 1, Int32(clamping: Int(left.milliseconds.rounded(.up))))
            if ready > 0 { return }
            if ready < 0 && errno != EINTR {
                throw DeltaStreamError.transport("waiting for \(what): \(String(cString: strerror(errno)))")
            }
        }
    }
}

/// Paces writes to at most `bytesPerSecond` (a token bucket with one second of burst).
public final class RateLimitedSink: ByteSink {
    private let inner: ByteSink
    private let rate: Double
    private var tokens: Double
    private var last: Date

    public init(_ inner: ByteSink, bytesPerSecond: UInt64) {
        self.inner = inner
        self.rate = Double(max(bytesPerSecond, 1))
        self.tokens = rate
        self.last = Date()
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        let now = Date()
        tokens = min(rate, tokens + now.timeIntervalSince(last) * rate)
        last = now
        tokens -= Double(bytes.count)
        if tokens < 0 {
            Thread.sleep(forTimeInterval: -tokens / rate)
        }
        try inner.write(bytes)
    }
}

/// Counts what passes through (bytes on the wire).
public final class CountingSink: ByteSink {
    private let inner: ByteSink
    public private(set) var count: UInt64 = 0
    public init(_ inner: ByteSink) { self.inner = inner }
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        try inner.write(bytes)
        count += UInt64(bytes.count)
    }
}
