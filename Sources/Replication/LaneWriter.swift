import Foundation

/// A destination's queue of frames, sent on a thread of its own; holds at most `capacity`
/// bytes (and always at least one frame).
final class LaneWriter: @unchecked Sendable {
    private let destination: FrameDestination
    private let capacity: Int
    // Guarded by `condition`.
    private let condition = NSCondition()
    private var queue: [EncodedFrame] = []
    private var head = 0
    private var queuedBytes = 0
    private var closed = false
    private var done = false
    private var failed: String?

    init(_ destination: FrameDestination, capacity: Int) {
        self.destination = destination
        self.capacity = capacity
        Thread { [self] in run() }.start()
    }

    /// Why sending failed, if it did (frames offered after are dropped).
    var failure: String? { condition.withLock { failed } }

    /// Nothing queued: the destination is waiting for the reader.
    var isIdle: Bool { condition.withLock { queuedBytes == 0 } }

    /// Waits until a frame was sent (or `limit` passed).
    func waitForSpace(upTo limit: Duration) {
        condition.withLock {
            let before = queuedBytes
            let deadline = Date().addingTimeInterval(limit.seconds)
            while queuedBytes == before && failed == nil && !done {
                if !condition.wait(until: deadline) { return }
            }
        }
    }

    /// Queues a frame; false (and nothing queued) when the queue is full.
    func offer(_ frame: EncodedFrame) -> Bool {
        condition.withLock {
            if queuedBytes > 0 && queuedBytes + frame.bytes.count > capacity { return false }
            queue.append(frame)
            queuedBytes += frame.bytes.count
            condition.broadcast()
            return true
        }
    }

    /// Drops what is queued and waits for the frame being sent, if any.
    func abandon() {
        condition.withLock {
            closed = true
            queuedBytes -= queue[head...].reduce(0) { $0 + $1.bytes.count }
            queue.removeAll()
            head = 0
            condition.broadcast()
            while !done { condition.wait() }
        }
    }

    /// Waits until every queued frame was sent (or sending failed); returns the failure.
    func finish() -> String? {
        condition.withLock {
            closed = true
            condition.broadcast()
            while !done { condition.wait() }
            return failed
        }
    }

    private func run() {
        while true {
            condition.lock()
            while head == queue.count && !closed { condition.wait() }
            if head == queue.count {
                done = true
                condition.broadcast()
                condition.unlock()
                return
            }
            let frame = queue[head]
            head += 1
            if head > 1024 {
                queue.removeFirst(head)
                head = 0
            }
            let failedAlready = failed != nil
            condition.unlock()
            var problem: String?
            if !failedAlready {
                do { try destination.send(frame) } catch { problem = "\(error)" }
            }
            condition.withLock {
                if let problem, failed == nil { failed = problem }
                queuedBytes -= frame.bytes.count
                condition.broadcast()
            }
        }
    }
}
