import Foundation
import Synchronization

/// Thrown by `withDeadline` when the operation did not finish in time.
public struct DeadlineExceeded: Error, Sendable, CustomStringConvertible {
    public var limit: Duration
    public var description: String { "timed out after \(formatDuration(limit))" }
}

/// One race between an operation and its deadline: whichever ends first resumes the caller.
private final class DeadlineRace<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T, any Error>?
        var work: Task<Void, Never>?
        var timer: Task<Void, Never>?
    }
    private let state = Mutex(State())

    func start(_ continuation: CheckedContinuation<T, any Error>, deadline: ContinuousClock.Instant, limit: Duration,
               operation: @escaping @Sendable () async throws -> T) {
        state.withLock { $0.continuation = continuation }
        let work = Task {
            let result: Result<T, any Error>
            do { result = .success(try await operation()) } catch { result = .failure(error) }
            if self.finish(result) { self.state.withLock { $0.timer?.cancel() } }
        }
        let timer = Task {
            try? await Task.sleep(until: deadline, clock: .continuous)
            guard !Task.isCancelled else { return }
            if self.finish(.failure(DeadlineExceeded(limit: limit))) { self.state.withLock { $0.work?.cancel() } }
        }
        state.withLock {
            $0.work = work
            $0.timer = timer
            // The race may already be over: do not leave a sleeping timer behind.
            if $0.continuation == nil { timer.cancel() }
        }
    }

    private func finish(_ result: Result<T, any Error>) -> Bool {
        let continuation = state.withLock { s -> CheckedContinuation<T, any Error>? in
            defer { s.continuation = nil }
            return s.continuation
        }
        continuation?.resume(with: result)
        return continuation != nil
    }
}

/// Runs `operation` and returns its result, or throws `DeadlineExceeded` at `deadline`
/// *without waiting for it*: a writer stuck in a blocking call must not hold up the
/// coordinator (structured task groups would wait). The abandoned task is cancelled.
public func withDeadline<T: Sendable>(
    _ deadline: ContinuousClock.Instant,
    limit: Duration,
    _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    let race = DeadlineRace<T>()
    return try await withCheckedThrowingContinuation { continuation in
        race.start(continuation, deadline: deadline, limit: limit, operation: operation)
    }
}

/// Runs blocking work (a syscall, a C library call that may wait) on a thread of its own,
/// so that it never occupies the small cooperative pool.
public func runBlocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            continuation.resume(with: Result { try body() })
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
}

/// `60s`, `1.5s`, `250ms`, `2m`: how durations are written in configs and shown in messages.
public func formatDuration(_ d: Duration) -> String {
    let ms = d.milliseconds
    if ms < 1000 { return String(format: "%.0f ms", ms) }
    if ms.truncatingRemainder(dividingBy: 1000) == 0 { return "\(Int(ms / 1000)) s" }
    return String(format: "%.1f s", ms / 1000)
}

/// Parses `60s`, `500ms`, `2m`, `1h`, `1.5s`; nil if malformed.
public func parseDuration(_ text: String) -> Duration? {
    let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        let number = text.dropLast(suffix.count)
        // "ms" also ends in "s": make sure the number part is a number.
        guard let value = Double(number), value >= 0, value.isFinite else { continue }
        return .milliseconds(Int64((value * scale * 1000).rounded()))
    }
    return nil
}

extension Duration {
    public var milliseconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) * 1000 + Double(attoseconds) / 1e15
    }
    public var seconds: Double { milliseconds / 1000 }
}
