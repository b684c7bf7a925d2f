import Foundation

/// Sends keepalive lines while the receiver works on an answer, so a sender waiting with an
/// idle timeout can tell slow work from a hung receiver. Only while the sender waits for an
/// answer: keepalives sent while it streams would pile up unread in the pipe.
final class Heartbeat: @unchecked Sendable {
    private let sink: ByteSink
    /// Set from the sender's hello; before the body of `beating` only.
    var interval: Duration = .seconds(10)
    private let condition = NSCondition()
    private var working = false

    init(sink: ByteSink) { self.sink = sink }

    /// Runs `body`, sending a keepalive every `interval` until it returns.
    func beating<T>(_ body: () throws -> T) rethrows -> T {
        let line = (try? SessionReply.line(SessionReply(ok: true, keepalive: true))) ?? []
        let interval = self.interval
        let stopped = DispatchSemaphore(value: 0)
        condition.lock()
        working = true
        condition.unlock()
        let thread = Thread { [self] in
            condition.lock()
            while working {
                if !condition.wait(until: Date(timeIntervalSinceNow: interval.seconds)), working {
                    // The sink is this thread's while the body works (the reply comes after it
                    // stopped); a failed write means the sender left, which the reply will find.
                    condition.unlock()
                    try? sink.write(line)
                    condition.lock()
                }
            }
            condition.unlock()
            stopped.signal()
        }
        thread.start()
        defer {
            condition.lock()
            working = false
            condition.signal()
            condition.unlock()
            stopped.wait()
        }
        return try body()
    }
}
