import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

/// `bench/run` is not part of the test suite (its figures depend on the machine), but a tiny
/// version of it runs here so that it does not rot: two cheap scenarios, the debug binary,
/// and a check that its JSON has the figures a full run reports.
@Suite("Benchmark smoke", .serialized, .enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct BenchSmokeTests {
    @Test func benchRunQuickWritesTheWindowsAndCatalogFigures() async throws {
        try TestEnvironment.requireWorlds()
        let quiesce = try Executables.requireQuiesce()
        let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
        // Short: the lab's PostgreSQL socket lives under it (sun_path is 108 bytes).
        let directory = "/tmp/qbs-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let jsonPath = directory + "/bench.json"

        let result = try await ChildProcess.run(packageRoot + "/bench/run", [
            "--quick", "--only", "windows,scale-catalog", "--checkpoints", "3", "--catalog", "500",
            "--quiesce", quiesce, "--json", jsonPath, "--tmp", directory,
        ], timeout: .seconds(240))
        try #require(result.succeeded, "bench/run failed (status \(result.status), timed out: \(result.timedOut)):\n\(result.stdout.suffix(2000))\n\(result.stderr.suffix(3000))")
        #expect(result.stdout.contains("hold and freeze windows"), "the table: \(result.stdout)")

        let data = try #require(FileManager.default.contents(atPath: jsonPath), "no JSON at \(jsonPath)")
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let machine = try #require(report["machine"] as? [String: Any])
        #expect((machine["nproc"] as? Int ?? 0) > 0)
        #expect((machine["memoryBytes"] as? Int ?? 0) > 0)
        #expect(machine["kernel"] is String && machine["lsblk"] != nil)
        let scenarios = try #require(report["scenarios"] as? [String: Any])

        let windows = try #require(scenarios["windows"] as? [[String: Any]])
        let first = try #require(windows.first)
        #expect(first["completed"] as? Int == 3, "\(first)")
        for key in ["freezeWindowMs", "holdWindowMs"] {
            let figures = try #require(first[key] as? [String: Any], "\(key) missing: \(first)")
            for stat in ["median", "p99", "min", "max"] {
                #expect((figures[stat] as? Double ?? 0) > 0, "\(key).\(stat) is not positive: \(figures)")
            }
        }

        let catalog = try #require(scenarios["scale-catalog"] as? [String: Any])
        #expect(catalog["checkpoints"] as? Int == 500)
        let operations = try #require(catalog["operations"] as? [String: Any])
        for op in ["checkpoints list --json", "checkpoints list --last 20 --json", "checkpoints prune --keep 100 --json (once)"] {
            let entry = try #require(operations[op] as? [String: Any], "\(op) missing: \(operations.keys.sorted())")
            let seconds = try #require(entry["seconds"] as? [String: Any])
            #expect((seconds["median"] as? Double ?? 0) > 0, "\(op): \(seconds)")
        }

        // Nothing left behind: no loop device backed by a file of the run, no mount under it.
        let loops = try await ChildProcess.run("losetup", ["-n", "-l", "-O", "BACK-FILE"])
        #expect(!loops.stdout.contains(directory), "loop devices left: \(loops.stdout)")
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        #expect(!mounts.contains(directory), "mounts left under \(directory)")
    }
}
