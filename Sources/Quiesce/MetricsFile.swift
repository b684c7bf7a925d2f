import Foundation
import QuiesceCatalog
import QuiesceCore

/// Prometheus text-format metrics for node_exporter's textfile collector, written atomically
/// (temp file + fsync + rename) so the collector never reads half a file.
public enum MetricsFile {
    public static func render(_ result: CheckpointResult, lastSuccess: CheckpointRecord?, writers: [WriterStatus]) -> String {
        var lines: [String] = []
        func metric(_ name: String, _ help: String, _ samples: [(String, Double)]) {
            lines.append("# HELP quiesce_\(name) \(help)")
            lines.append("# TYPE quiesce_\(name) gauge")
            for (labels, value) in samples { lines.append("quiesce_\(name)\(labels) \(format(value))") }
        }
        let record = result.record
        let ok = result.error == nil
        if let success = lastSuccess, let end = success.endedAt {
            metric("last_success_timestamp_seconds", "End of the last completed checkpoint (unix time).",
                   [("", end.timeIntervalSince1970)])
        }
        metric("last_run_timestamp_seconds", "End of the last checkpoint run (unix time).",
               [("", (record.endedAt ?? Date()).timeIntervalSince1970)])
        metric("last_run_success", "1 if the last checkpoint completed, 0 if it aborted.", [("", ok ? 1 : 0)])
        metric("last_run_duration_seconds", "Duration of the last checkpoint run.",
               [("", (record.endedAt ?? Date()).timeIntervalSince(record.startedAt))])
        metric("last_freeze_window_seconds", "First writer frozen to last writer thawed, last run.",
               [("", (record.freezeWindowMs ?? 0) / 1000)])
        metric("last_hold_window_seconds", "FIFREEZE to FITHAW (applications' I/O blocked), last run.",
               [("", (record.holdWindowMs ?? 0) / 1000)])
        metric("writer_state", "1 for each writer's current state.",
               writers.map { ("{writer=\"\(escape($0.name))\",state=\"\(escape($0.state))\"}", 1) })
        metric("writer_failed", "1 if the writer's last error is not none.",
               writers.map { ("{writer=\"\(escape($0.name))\",last_error=\"\($0.lastErrorKind.rawValue)\"}",
                              $0.lastErrorKind == .none ? 0 : 1) })
        return lines.joined(separator: "\n") + "\n"
    }

    public static func write(_ text: String, to path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        let temporary = "\(directory.isEmpty ? "." : directory)/.\((path as NSString).lastPathComponent).\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw POSIXFailure("create \(temporary)", errno) }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == bytes.count, synced else {
            unlink(temporary)
            throw POSIXFailure("write \(temporary)", errno)
        }
        guard rename(temporary, path) == 0 else {
            let code = errno
            unlink(temporary)
            throw POSIXFailure("rename \(temporary) to \(path)", code)
        }
    }

    private static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(format: "%.6f", value)
    }

    private static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }
}
