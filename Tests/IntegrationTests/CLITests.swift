import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

/// `quiesce` as cron and operators run it: exit codes, messages, the registry, the catalog, metrics.
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI), .serialized)
struct CLITests {
    @Test func secondConcurrentCheckpointExits75AtOnceNamingTheHolder() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let frozenMark = world.path("frozen")
            let release = world.path("release")
            _ = FileManager.default.createFile(atPath: release, contents: nil)
            // The first run's writer stays frozen until the test lets it go.
            try site.addExecWriter("app", timeout: "60s", onFreeze: "touch \(frozenMark); while [ -e \(release) ]; do sleep 0.05; done")
            let first = try site.startCLI(["checkpoint", "--label", "first"])
            #expect(await eventually(within: .seconds(30)) { FileManager.default.fileExists(atPath: frozenMark) })

            let started = ContinuousClock.now
            let second = try await site.runCLI(["checkpoint", "--label", "second"])
            let took = ContinuousClock.now - started
            unlink(release)
            #expect(second.status == 75, "second run: exit \(second.status) \(second.stderr)")
            // At once: it does not wait for the holder (a generous bound for a loaded machine).
            #expect(took < .seconds(10))
            #expect(second.stderr.contains("pid \(first.pid)"))
            #expect(second.stderr.contains("--label first"))

            let status = await exitStatus(of: first, within: .seconds(30))
            first.terminate()
            #expect(status == 0, "first run: \(String(describing: status))")
            let records = try site.installation().listCheckpoints(limit: nil)
            #expect(records.map(\.label) == ["first"])
        }
    }

    @Test func withoutCapSysAdminNothingFreezesAndTheErrorSaysWhy() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            let result = try await ChildProcess.run("setpriv", [
                "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                try Executables.requireQuiesce(), "checkpoint", "--config", site.config,
            ])
            #expect(result.status == 5, "exit \(result.status): \(result.stderr)")
            #expect(result.stderr.contains("CAP_SYS_ADMIN"))
            #expect(site.calls("app") == [], "a writer was frozen although the filesystem could not be")
        }
    }

    @Test func badConfigurationExits78NamingTheFileAndLine() async throws {
        try await withTemporaryDirectory { directory in
            let config = "\(directory)/quiesce.toml"
            try """
                [coordinator]
                catalog = "\(directory)/catalog.db"
                hold_timeout = "ten seconds"

                [[volume]]
                name = "vm1"
                image = "\(directory)/vm1.img"

                """.write(toFile: config, atomically: true, encoding: .utf8)
            let result = try await ChildProcess.run(try Executables.requireQuiesce(), ["checkpoint", "--config", config])
            #expect(result.status == 78)
            #expect(result.stderr.contains("\(config):3"))
            #expect(result.stderr.contains("hold_timeout"))

            let missing = try await ChildProcess.run(try Executables.requireQuiesce(), ["checkpoint", "--config", "\(directory)/nope.toml"])
            #expect(missing.status == 78)
            #expect(missing.stderr.contains("nope.toml"))
        }
    }

    @Test func badDropInIsListedBesideTheGoodOnesAndStopsCheckpoints() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            try """
                name = "typo"
                type = "exec"
                comand = "/bin/true"
                volume = "vm1"

                """.write(toFile: "\(site.writersDirectory)/typo.toml", atomically: true, encoding: .utf8)
            try "name = \"ignored\"\ntype = \"nonsense\"\n"
                .write(toFile: "\(site.writersDirectory)/old.toml.dpkg-old", atomically: true, encoding: .utf8)

            let list = try await site.runCLI(["writers", "list", "--json"])
            #expect(list.status == 78)
            let listings = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]] ?? []
            #expect(listings.compactMap { $0["name"] as? String }.sorted() == ["app", "typo"])
            let typo = listings.first { $0["name"] as? String == "typo" }
            #expect(typo?["state"] as? String == "invalid-spec")
            #expect((typo?["lastErrorMessage"] as? String)?.contains("typo.toml") ?? false)

            let checkpoint = try await site.runCLI(["checkpoint"])
            #expect(checkpoint.status == 78)
            #expect(checkpoint.stderr.contains("typo.toml"))
            #expect(checkpoint.stderr.contains("comand"))
            #expect(site.calls("app") == [], "a checkpoint ran with a broken writer spec")
        }
    }

    @Test func writersAddValidatesThenInstallsWithMode0600() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            let good = world.path("good.toml")
            try "name = \"hook\"\ntype = \"exec\"\ncommand = \"/bin/true\"\nvolume = \"vm1\"\n"
                .write(toFile: good, atomically: true, encoding: .utf8)
            let bad = world.path("bad.toml")
            try "name = \"broken\"\ntype = \"sqlite\"\n".write(toFile: bad, atomically: true, encoding: .utf8)

            let refused = try await site.runCLI(["writers", "add", bad])
            #expect(refused.status == 78)
            #expect(refused.stderr.contains("database"))
            #expect(!FileManager.default.fileExists(atPath: "\(site.writersDirectory)/broken.toml"))

            // A writer that cannot reach its application is refused (unless told to skip the check).
            let unreachable = world.path("unreachable.toml")
            try "name = \"missing\"\ntype = \"exec\"\ncommand = \"/usr/local/sbin/not-installed\"\nvolume = \"vm1\"\n"
                .write(toFile: unreachable, atomically: true, encoding: .utf8)
            let notReady = try await site.runCLI(["writers", "add", unreachable])
            #expect(notReady.status == 3, "\(notReady.stderr)")
            #expect(notReady.stderr.contains("not-installed is not an executable file"))
            #expect(!FileManager.default.fileExists(atPath: "\(site.writersDirectory)/missing.toml"))
            let skipped = try await site.runCLI(["writers", "add", "--skip-check", unreachable])
            #expect(skipped.status == 0, "\(skipped.stderr)")

            let added = try await site.runCLI(["writers", "add", good])
            #expect(added.status == 0, "\(added.stderr)")
            let installed = "\(site.writersDirectory)/hook.toml"
            let mode = try FileManager.default.attributesOfItem(atPath: installed)[.posixPermissions] as? Int
            #expect(mode == 0o600)

            let check = try await site.runCLI(["writers", "check", "hook"])
            #expect(check.status == 0, "\(check.stderr)")
            #expect(check.stdout.contains("vm1"))
            let unknown = try await site.runCLI(["writers", "check", "nobody"])
            #expect(unknown.status == 64)

            let removed = try await site.runCLI(["writers", "remove", "hook"])
            #expect(removed.status == 0)
            #expect(!FileManager.default.fileExists(atPath: installed))
        }
    }

    @Test func checkpointsAreListedShownAndPrunedWithTheirSnapshots() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            for n in 1...3 {
                let run = try await site.runCLI(["checkpoint", "--label", "run\(n)"])
                #expect(run.status == 0, "\(run.stderr)")
            }
            let list = try await site.runCLI(["checkpoints", "list", "--json"])
            let records = try JSONDecoder.iso8601.decode([CheckpointRecord].self, from: Data(list.stdout.utf8))
            #expect(records.map(\.label) == ["run1", "run2", "run3"])
            #expect(records.allSatisfy { $0.outcome == .completed && $0.holdWindowMs != nil })

            let show = try await site.runCLI(["checkpoints", "show", records[1].id])
            #expect(show.status == 0)
            #expect(show.stdout.contains("writer app (exec): stable"))
            #expect(show.stdout.contains("marker: calls="))

            let prune = try await site.runCLI(["checkpoints", "prune", "--keep", "1"])
            #expect(prune.status == 0, "\(prune.stderr)")
            #expect(site.snapshotFiles() == ["\(records[2].id).img"])
            let left = try site.installation().listCheckpoints(limit: nil)
            #expect(left.map(\.id) == [records[2].id])

            let zero = try await site.runCLI(["checkpoints", "prune", "--keep", "0"])
            #expect(zero.status == 64)
        }
    }

    @Test func metricsFileIsWrittenForTheTextfileCollector() async throws {
        try await TestWorld.with { world in
            let site = try TestSite(world)
            try site.addExecWriter("app")
            let metrics = world.path("quiesce.prom")
            let run = try await site.runCLI(["checkpoint", "--metrics-file", metrics])
            #expect(run.status == 0, "\(run.stderr)")
            let text = try String(contentsOfFile: metrics, encoding: .utf8)
            #expect(text.contains("quiesce_last_run_success 1"))
            #expect(text.contains("quiesce_last_success_timestamp_seconds "))
            #expect(text.contains("quiesce_last_hold_window_seconds "))
            #expect(text.contains("quiesce_writer_state{writer=\"app\",state=\"stable\"} 1"))
            // Written by rename: no temporary file is left beside it.
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: world.root).filter { $0.hasSuffix(".tmp") }
            #expect(leftovers.isEmpty)
        }
    }
}
