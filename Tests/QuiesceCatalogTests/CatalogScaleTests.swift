import Foundation
import QuiesceCore
import Testing
@testable import QuiesceCatalog

@Suite("Catalog at scale")
struct CatalogScaleTests {
    /// Years of checkpoints every few minutes: listing and pruning still answer, and answer right.
    @Test func catalogWithAHundredThousandCheckpointsListsAndPrunes() async throws {
        try await withTemporaryDirectory { dir in
            let count = 100_000
            let catalog = try Catalog(path: "\(dir)/catalog.db")
            let pg = WriterResult(name: "pg-main", type: "postgresql", state: "stable",
                                  marker: ConsistencyMarker(["lsn": "0/3000060"]))
            // Every 10th run aborted (no snapshots), the rest completed with one snapshot.
            let records = (0..<count).map { n in checkpoint(n, n % 10 == 7 ? .aborted : .completed, writers: [pg]) }
            // The heavy work runs on threads of its own: blocking the two cooperative threads for
            // seconds would starve every other test running in parallel.
            try await runBlocking { try catalog.recordAll(records) }
            let completed = records.filter { $0.outcome == .completed }
            let held = [completed[0].id, completed[500].id, completed[completed.count - 3].id]
            for id in held { try catalog.hold(checkpointID: id, holder: "dr-site-a") }

            let all = try await runBlocking { try catalog.checkpoints() }
            #expect(all.count == count)
            #expect(all.first == records.first)
            #expect(all.last == records.last)
            #expect(try catalog.checkpoints(limit: 25).map(\.id) == records.suffix(25).map(\.id))
            // The text listing's summary: every checkpoint as it was, without writers and snapshots.
            let summaries = try await runBlocking { try catalog.checkpoints(details: false) }
            #expect(summaries.count == count)
            #expect(summaries.allSatisfy { $0.writers.isEmpty && $0.snapshots.isEmpty })
            var stripped = records[count - 1]
            (stripped.writers, stripped.snapshots) = ([], [])
            #expect(summaries.last == stripped)
            #expect(try catalog.latestCompleted(volume: "vm1") == completed.last)

            let keep = 30
            let oldestKept = completed[completed.count - keep]
            let expected = records.filter { record in
                switch record.outcome {
                case .completed: record.startedAt < oldestKept.startedAt && !held.contains(record.id)
                case .aborted: record.startedAt < oldestKept.startedAt
                case .running: false
                }
            }
            let candidates = try await runBlocking { try catalog.pruneCandidates(keep: keep) }
            // Compared as sets, then order: a failure names a few ids, not 100,000.
            let ids = candidates.map(\.id)
            let wrong = Set(ids).symmetricDifference(expected.map(\.id)).sorted()
            #expect(candidates.count == expected.count)
            #expect(wrong.isEmpty, "\(wrong.count) checkpoints wrongly in or out, e.g. \(wrong.prefix(5))")
            #expect(zip(ids, ids.dropFirst()).allSatisfy { $0 < $1 }, "candidates are not oldest first")
            #expect(candidates.first { $0.outcome == .completed }?.snapshots == completed[1].snapshots)

            for record in candidates.prefix(100) { try catalog.delete(checkpointID: record.id) }
            #expect(try catalog.checkpoints().count == count - 100)
            #expect(try catalog.pruneCandidates(keep: keep).count == expected.count - 100)
        }
    }
}
