import Foundation
import QuiesceCore
import Synchronization

/// Opens sessions with receivers over the transports that are byte pipes: a local
/// `quiesce receive --session` process (`file://` targets) and the same over the system's
/// ssh (`ssh://`). TLS (`quiesce://`) hands in a connected socket instead.
public enum ReceiverConnection {
    /// Starts `executable arguments` (a receiver speaking the session protocol on its
    /// stdin/stdout) and opens a session with it.
    /// `idleTimeout`: how long to wait for the receiver to take bytes or answer.
    public static func spawn(name: String, executable: String, arguments: [String], compressionLevel: Int32?,
                             bytesPerSecond: UInt64?, idleTimeout: Duration?) throws -> ReceiverSession {
        let child: ChildProcess
        do {
            child = try ChildProcess(executable, arguments, stdin: .pipe, stdout: .pipe, stderr: .pipe)
        } catch {
            throw DeltaStreamError.transport("\(name): cannot start \(executable): \(error)")
        }
        let errors = StderrCollector(fd: child.stderrFD)
        let stream = FileDescriptorStream(fd: child.stdoutFD, what: name, idleTimeout: idleTimeout)
        let input = FileDescriptorStream(fd: child.stdinFD, what: name, idleTimeout: idleTimeout)
        let sink: ByteSink = bytesPerSecond.map { RateLimitedSink(input, bytesPerSecond: $0) } ?? input
        return ReceiverSession(name: name, source: stream, sink: sink, compressionLevel: compressionLevel, idleTimeout: idleTimeout,
                               diagnostics: { errors.text(waitingFor: child) }, onClose: {
                                   child.closeStdin()
                                   // A receiver that ignores the end of its input is not waited for forever.
                                   let deadline = ContinuousClock.now + (idleTimeout ?? .seconds(3600))
                                   while child.poll() == nil, ContinuousClock.now < deadline { usleep(10_000) }
                                   if child.poll() == nil {
                                       child.signal(SIGKILL)
                                       child.wait()
                                   }
                                   errors.finish()
                               })
    }

    /// A session over a connected socket (the TLS pipe's local end); closes it at the end.
    public static func socket(name: String, fd: Int32, compressionLevel: Int32?, bytesPerSecond: UInt64?,
                              idleTimeout: Duration?) -> ReceiverSession {
        let stream = FileDescriptorStream(fd: fd, what: name, idleTimeout: idleTimeout)
        let sink: ByteSink = bytesPerSecond.map { RateLimitedSink(stream, bytesPerSecond: $0) } ?? stream
        return ReceiverSession(name: name, source: stream, sink: sink, compressionLevel: compressionLevel, idleTimeout: idleTimeout,
                               onClose: { close(fd) })
    }
}

/// Reads a child's stderr on its own thread (so the child never blocks on it) and keeps
/// the last few KiB to quote in errors.
final class StderrCollector: Sendable {
    private let buffer = Mutex<[UInt8]>([])
    private let done = Mutex(false)
    private let fd: Int32

    init(fd: Int32) {
        self.fd = fd
        let thread = Thread { [self] in
            var chunk = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0, errno == EINTR { continue }
                if n <= 0 { break }
                buffer.withLock {
                    $0 += chunk[0..<n]
                    if $0.count > 8192 { $0.removeFirst($0.count - 8192) }
                }
            }
            done.withLock { $0 = true }
        }
        thread.start()
    }

    /// What the child said; waits briefly for it to exit so its last words are in.
    func text(waitingFor child: ChildProcess) -> String {
        for _ in 0..<50 where !done.withLock({ $0 }) { usleep(20_000) }
        return buffer.withLock { String(decoding: $0, as: UTF8.self) }
            .split(separator: "\n").suffix(5).joined(separator: "; ")
    }

    func finish() {
        for _ in 0..<100 where !done.withLock({ $0 }) { usleep(10_000) }
    }
}
