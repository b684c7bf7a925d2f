import Foundation
import QuiesceCore

/// A fresh directory under $TMPDIR for one test, removed afterwards.
func withTemporaryDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
    let temporary = (NSTemporaryDirectory() as NSString).appendingPathComponent("quiesce-catalog-test.XXXXXX")
    var template = Array(temporary.utf8CString)
    guard let made = mkdtemp(&template) else { throw POSIXFailure("mkdtemp", errno) }
    let directory = String(cString: made)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    return try await body(directory)
}

/// A time on a whole millisecond, `minutes` after a fixed origin (2026-11-25T11:40:12.345Z).
func time(minutes: Int) -> Date {
    Date(timeIntervalSince1970: Double(1_795_606_812_345 + Int64(minutes) * 60_000) / 1000)
}

/// A checkpoint as the coordinator finishes it, `minutes` after the origin.
func checkpoint(_ minutes: Int, _ outcome: CheckpointRecord.Outcome, label: String? = nil,
                writers: [WriterResult] = [], volumes: [String] = ["vm1"]) -> CheckpointRecord {
    let start = time(minutes: minutes)
    var record = CheckpointRecord(id: CheckpointRecord.makeID(at: start), label: label, startedAt: start)
    record.outcome = outcome
    if outcome != .running {
        record.endedAt = start.addingTimeInterval(2.5)
    }
    record.writers = writers
    if outcome == .completed {
        record.freezeWindowMs = 812.25
        record.holdWindowMs = 41.5
        record.snapshots = volumes.map {
            SnapshotFile(volume: $0, image: "/srv/images/\($0).img",
                         path: "/srv/snapshots/\(record.id)/\($0).img", sizeBytes: 21_474_836_480)
        }
    }
    return record
}
