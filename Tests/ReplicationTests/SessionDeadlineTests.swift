import Foundation
import QuiesceCore
@testable import QuiesceReplication
import QuiesceTestSupport
import Synchronization
import Testing

/// A sender never waits forever on a receiver: no progress for the idle timeout ends the
/// wait with an error naming the peer, while a receiver working on an answer says so.
@Suite struct SessionDeadlineTests {
    @Test func aReadFromASilentPeerEndsAfterTheIdleTimeoutNamingIt() throws {
        let (reader, writer) = try Self.pipe()
        defer { close(reader); close(writer) }
        let stream = FileDescriptorStream(fd: reader, what: "target quiet", idleTimeout: .milliseconds(300))
        let error = #expect(throws: DeltaStreamError.self) { _ = try stream.read(upTo: 16) }
        #expect(error?.description.contains("target quiet sent nothing for 300 ms") == true, "\(String(describing: error))")

        // What does arrive is read at once.
        _ = Foundation.write(writer, "hi", 2)
        #expect(try stream.read(upTo: 16) == Array("hi".utf8))
    }

    @Test func aWriteToAPeerThatStoppedReadingEndsAfterTheIdleTimeout() throws {
        let (reader, writer) = try Self.pipe()
        defer { close(reader); close(writer) }
        let stream = FileDescriptorStream(fd: writer, what: "target stuck", idleTimeout: .milliseconds(300))
        // More than any pipe buffer holds, and nobody reads.
        let error = #expect(throws: DeltaStreamError.self) { try stream.write([UInt8](repeating: 7, count: 4 << 20)) }
        #expect(error?.description.contains("target stuck took no bytes for 300 ms") == true, "\(String(describing: error))")
    }

    /// The receiver's verify takes four idle timeouts; its keepalives carry the session through.
    @Test func aVerifyLongerThanTheIdleTimeoutIsWaitedForThroughKeepalives() throws {
        try withTemporaryDirectory { directory in
            let store = try DRStore(root: directory + "/store", create: true)
            let (reply, verified) = try Self.session(store: store, idleTimeout: .milliseconds(400)) { _ in
                usleep(1_600_000)
                return VerificationOutcome(ok: true, failures: [])
            }
            #expect(verified)
            #expect(reply?.verification?.ok == true)
            #expect(reply?.checkpoint == DeltaStreamTests.checkpoint)
            #expect(store.checkpoints(volume: "vm1") == [DeltaStreamTests.checkpoint])
        }
    }

    /// One full stream through a session with a `Receiver.serve` on the other end of a socketpair.
    static func session(store: DRStore, idleTimeout: Duration,
                        verify: @escaping @Sendable (ReceiveSummary) -> VerificationOutcome) throws -> (ReceiveSummary?, Bool) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw POSIXFailure("socketpair", errno) }
        let (ours, theirs) = (fds[0], fds[1])
        let served = DispatchSemaphore(value: 0)
        let ran = Mutex(false)
        Thread {
            let receiverSide = FileDescriptorStream(fd: theirs, what: "sender")
            try? Receiver.serve(source: receiverSide, sink: receiverSide, store: store, keep: 3,
                                verify: { summary in ran.withLock { $0 = true }; return verify(summary) })
            close(theirs)
            served.signal()
        }.start()
        let stream = FileDescriptorStream(fd: ours, what: "target dr", idleTimeout: idleTimeout)
        let session = ReceiverSession(name: "target dr", source: stream, sink: stream, compressionLevel: nil,
                                      idleTimeout: idleTimeout, onClose: { close(ours) })
        _ = try session.hello(volume: "vm1")
        let header = DeltaStreamHeader(volume: "vm1", imageSize: DeltaStreamTests.imageSize, base: nil,
                                       target: DeltaStreamTests.checkpoint)
        try DeltaStreamTests.send(DeltaStreamTests.chunks(), to: session, header: header)
        let applied = try session.awaitApplied()
        session.close()
        served.wait()
        return (applied, ran.withLock { $0 })
    }

    static func pipe() throws -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        guard Glibc.pipe(&fds) == 0 else { throw POSIXFailure("pipe", errno) }
        return (fds[0], fds[1])
    }
}
