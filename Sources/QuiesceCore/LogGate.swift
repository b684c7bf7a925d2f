import Foundation
import Logging
import Synchronization

/// Holds log lines in memory while guest filesystems are frozen, so that no log
/// line can block on (or land in) a frozen filesystem through a redirected stderr.
public final class LogGate: Sendable {
    public static let shared = LogGate()

    private struct State {
        /// Holds in effect: several checkpoints may run in one process (tests, a future daemon).
        var holds = 0
        var buffer: [String] = []
    }
    private let state = Mutex(State())

    public init() {}

    /// From now on, lines wait in memory.
    public func hold() { state.withLock { $0.holds += 1 } }

    /// Ends one hold; when none is left, writes out what waited and lets lines through again.
    public func release() {
        let lines = state.withLock { s -> [String] in
            s.holds = max(0, s.holds - 1)
            guard s.holds == 0 else { return [] }
            defer { s.buffer.removeAll() }
            return s.buffer
        }
        for line in lines { Self.writeStderr(line) }
    }

    /// Lines waiting for the release (for tests).
    var pending: [String] { state.withLock { $0.buffer } }

    func emit(_ line: String) {
        let passed = state.withLock { s -> Bool in
            if s.holds > 0 { s.buffer.append(line); return false }
            return true
        }
        if passed { Self.writeStderr(line) }
    }

    private static func writeStderr(_ line: String) {
        var text = line
        if !text.hasSuffix("\n") { text += "\n" }
        text.utf8CString.withUnsafeBufferPointer { buffer in
            _ = write(2, buffer.baseAddress, buffer.count - 1)
        }
    }
}

/// A swift-log handler that writes `time level [label] message key=value…` to stderr through a `LogGate`.
public struct GatedLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let label: String
    private let gate: LogGate

    public init(label: String, level: Logger.Level = .info, gate: LogGate = .shared) {
        self.label = label
        self.logLevel = level
        self.gate = gate
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }
        let level = event.level, message = event.message
        let fields = merged.keys.sorted().map { "\($0)=\(merged[$0]!)" }.joined(separator: " ")
        let stamp = ISO8601DateFormatter.string(from: Date(), timeZone: .gmt,
                                                formatOptions: [.withInternetDateTime, .withFractionalSeconds])
        let error = event.error.map { " error=\($0)" } ?? ""
        gate.emit("\(stamp) \(level) [\(label)] \(message)\(fields.isEmpty ? "" : " " + fields)\(error)")
    }
}
