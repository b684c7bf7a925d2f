import Foundation
import Logging
import Quiesce
import QuiesceConfig
import QuiesceCore
import QuiesceTestSupport
import Testing

private let worlds = TestEnvironment.canBuildWorlds || TestEnvironment.isCI

/// The postgresql writer against a real PostgreSQL 15 started by the tests as the `postgres`
/// user, inside a real guest filesystem on a loop device, with real checkpoints
/// (`Installation.checkpoint`, as `quiesce checkpoint` runs it).
@Suite("PostgreSQL writer", .serialized)
struct PostgreSQLTests {
    /// The least-privilege role the docs prescribe.
    static let roleSQL = """
        CREATE ROLE quiesce LOGIN PASSWORD 'quiesce-secret';
        GRANT pg_checkpoint, pg_read_all_settings TO quiesce;
        GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO quiesce;
        """

    // MARK: spec validation (no server)

    @Test func specWithAPasswordInConninfoIsRefused() throws {
        for conninfo in ["host=/tmp user=quiesce password=hunter2", "postgresql://quiesce:hunter2@localhost/postgres",
                         "host=/tmp PASSWORD = hunter2"] {
            let error = #expect(throws: ConfigError.self) { try Self.makeWriter(conninfo: conninfo) }
            #expect(error?.description.contains("must not contain a password") == true, "\(conninfo): \(String(describing: error))")
        }
        #expect(throws: ConfigError.self) { try Self.makeWriter(conninfo: "host=/tmp", extra: "mode = \"backup\"\n") }
        #expect(throws: ConfigError.self) { try Self.makeWriter(conninfo: "host=/tmp", extra: "passfile = \"relative\"\n") }
        #expect(throws: ConfigError.self) { try Self.makeWriter(conninfo: "host=/tmp", extra: "statment_timeout = \"5s\"\n") }
        let writer = try Self.makeWriter(conninfo: "host=/tmp user=quiesce", extra: "mode = \"backup-label\"\n")
        #expect(writer.type == "postgresql")
    }

    static func makeWriter(conninfo: String, extra: String = "") throws -> any Writer {
        let text = "name = \"pg\"\ntype = \"postgresql\"\nconninfo = \"\(conninfo)\"\n" + extra
        let table = try TOMLParser.parse(text, file: "/etc/quiesce/writers.d/pg.toml")
        return try WriterTypes.makeWriter(WriterSpec(file: "/etc/quiesce/writers.d/pg.toml", table: table),
                                          defaultTimeout: .seconds(30)).0
    }

    // MARK: checkpoints under load

    /// Under pgbench load and a process committing monotonic ids (each commit's WAL position
    /// recorded after it committed), checkpoints by the least-privilege role: every snapshot,
    /// attached as a writable copy, starts cleanly through the writer's verify (not in recovery,
    /// WAL position ≥ marker, pg_amcheck clean), and holds every id committed at or before the
    /// freeze marker's LSN.
    @Test(.enabled(if: worlds))
    func checkpointUnderPgbenchLoadStartsCleanlyOnCopiesAndHoldsEveryCommitBeforeTheMarker() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        _ = try Executables.requireQuiesce()
        try await TestWorld.with(.init(imageSize: 512 << 20)) { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql(Self.roleSQL)
                try await cluster.psql("CREATE TABLE ids (id bigint PRIMARY KEY)")
                try await Self.pgbench(cluster, ["-i", "-s", "1", "-q"])
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster)
                let installation = try site.quietInstallation()
                let volumes = try await installation.checkWriter(name: "pg")
                #expect(volumes.map(\.name) == ["vm1"])
                // Every checkpoint below runs as this role: no superuser, no replication, only the grants in docs/writers.md.
                #expect(try await cluster.psql("SELECT rolsuper::text || ' ' || rolreplication::text FROM pg_roles WHERE rolname = 'quiesce'") == "false false")

                let load = try Self.startPgbench(cluster, seconds: 120)
                let ids = try IdInserter(cluster, log: world.path("ids.log"))
                var records: [CheckpointRecord] = []
                do {
                    #expect(await eventually(within: .seconds(10)) { ids.committed().count > 20 }, "the id inserter committed nothing")
                    for n in 1...3 {
                        let result = try await installation.checkpoint(label: "pgbench-\(n)")
                        try #require(result.error == nil, "checkpoint \(n): \(result.error.map { "\($0)" } ?? "")")
                        #expect(result.thawErrors.isEmpty, "thaw errors: \(result.thawErrors)")
                        records.append(result.record)
                        try await Task.sleep(for: .milliseconds(700))
                    }
                } catch {
                    ids.stop()
                    load.signal(SIGKILL)
                    load.wait()
                    throw error
                }
                ids.stop()
                load.signal(SIGINT)
                load.wait()
                let committed = ids.committed()
                #expect(committed.count > 50, "only \(committed.count) ids committed under load")

                let writer = try #require(installation.registry().writers.first { $0.name == "pg" })
                for (index, record) in records.enumerated() {
                    let result = try #require(record.writers.first { $0.name == "pg" })
                    let marker = try #require(result.marker)
                    let lsn = try #require(marker["lsn"].flatMap(lsnValue), "marker \(marker.summary)")
                    #expect(marker["mode"] == "checkpoint")
                    #expect(marker["timeline"] == "1")
                    #expect(marker["server_version"]?.hasPrefix("15") == true)
                    print("postgresql under pgbench: checkpoint \(record.id): freeze window \(ms(record.freezeWindowMs)), "
                          + "hold window \(ms(record.holdWindowMs)), marker \(marker.summary)")
                    let expected = committed.filter { $0.lsn <= lsn }.map(\.id).max() ?? 0
                    try await Self.withWritableCopy(of: record, world: world, index: index) { copy in
                        let report = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                        #expect(report.ok, "\(record.id) verify: \(report.details.joined(separator: "\n"))")
                        #expect(report.details.contains { $0.contains("pg_amcheck --all: clean") })
                        #expect(report.details.contains { $0.contains("pg_is_in_recovery(): false") })
                        #expect(report.details.contains { $0.contains("redo") || $0.contains("not properly shut down") },
                                "no recovery lines reported: \(report.details)")
                        if index == 0 { print("postgresql verify of \(record.id):\n  " + report.details.joined(separator: "\n  ")) }
                        // The copy, started again (cleanly shut down by verify): every id committed by the marker is there.
                        let copied = try PostgresCluster(dataDirectory: copy + "/pg/data", scratch: world.path("copy-server-\(index)"))
                        let found = try await copied.running { server in
                            try await server.psql("SELECT count(*) || ' ' || coalesce(max(id), 0) FROM ids")
                        }
                        let numbers = found.split(separator: " ").compactMap { Int64($0) }
                        try #require(numbers.count == 2, "\(found)")
                        #expect(numbers[0] == numbers[1], "ids in the copy are not 1…n: count \(numbers[0]), max \(numbers[1])")
                        #expect(numbers[1] >= expected,
                                "\(record.id): the copy holds ids up to \(numbers[1]), but id \(expected) committed at or before the marker \(marker["lsn"] ?? "")")
                        print("postgresql copy of \(record.id): ids 1…\(numbers[1]) (committed by the marker: 1…\(expected))")
                    }
                }
            }
        }
    }

    // MARK: backup-label mode

    /// backup-label mode: pg_backup_start at freeze, pg_backup_stop at thaw; the label and the
    /// stop LSN are kept in the checkpoint's writer result (never in the live data directory),
    /// the backup is over afterwards, and the copy starts cleanly.
    @Test(.enabled(if: worlds))
    func backupLabelModeKeepsTheLabelInTheCheckpoint() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with(.init(imageSize: 512 << 20)) { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql(Self.roleSQL)
                try await Self.pgbench(cluster, ["-i", "-s", "1", "-q"])
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster, mode: "backup-label")
                let installation = try site.quietInstallation()
                let load = try Self.startPgbench(cluster, seconds: 60)
                let result: CheckpointResult
                do {
                    try await Task.sleep(for: .milliseconds(500))
                    result = try await installation.checkpoint(label: "with-label")
                } catch {
                    load.signal(SIGKILL)
                    load.wait()
                    throw error
                }
                load.signal(SIGINT)
                load.wait()
                try #require(result.error == nil, "\(result.error.map { "\($0)" } ?? "")")
                #expect(result.thawErrors.isEmpty)
                let writerResult = try #require(result.record.writers.first { $0.name == "pg" })
                let marker = try #require(writerResult.marker)
                let files = try #require(writerResult.recovery?.files, "no recovery metadata kept")
                let label = try #require(files["backup_label"])
                #expect(label.contains("START WAL LOCATION: \(marker["lsn"] ?? "?")"), "\(label)")
                #expect(label.contains("LABEL: quiesce \(result.record.id)"), "\(label)")
                #expect(label.hasSuffix("\n"))
                let stop = try #require(files["backup_stop_lsn"].flatMap(lsnValue))
                #expect(stop >= (marker["lsn"].flatMap(lsnValue) ?? .max))
                #expect(files["tablespace_map"] == nil)
                // Kept in the catalog too.
                let shown = try installation.showCheckpoint(id: result.record.id)
                #expect(shown.writers.first { $0.name == "pg" }?.recovery?.files["backup_label"] == label)
                print("postgresql backup-label: freeze window \(ms(result.record.freezeWindowMs)), hold window \(ms(result.record.holdWindowMs))\n\(label)")

                #expect(!FileManager.default.fileExists(atPath: cluster.dataDirectory + "/backup_label"),
                        "a backup_label was written into the live data directory")
                #expect(try await cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'quiesce%'") == "0")
                // The backup is over: another one starts and stops in one session.
                try await cluster.psql("SELECT pg_backup_start('after', true); SELECT lsn FROM pg_backup_stop(false);")

                let writer = try #require(installation.registry().writers.first { $0.name == "pg" })
                try await Self.withWritableCopy(of: result.record, world: world, index: 0) { copy in
                    let report = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                    #expect(report.ok, "verify: \(report.details.joined(separator: "\n"))")
                }
            }
        }
    }

    /// What the DR side does with a backup-label checkpoint and a WAL archive: on a copy of the
    /// snapshot, write the kept backup_label byte for byte, set restore_command to the archive and
    /// start: PostgreSQL recovers from the label's start LSN and reaches consistency.
    @Test(.enabled(if: worlds))
    func backupLabelCopyRestoredWithTheArchivedWALReachesConsistency() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with(.init(imageSize: 512 << 20)) { world in
            let archive = try world.makeDirectory("archive")
            try PostgresCluster.chownToPostgres(archive)
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql("ALTER SYSTEM SET archive_mode = on")
                try await cluster.psql("ALTER SYSTEM SET archive_command = 'cp %p \(archive)/%f'")
                await cluster.stop()
                try await cluster.start()
                try await cluster.psql(Self.roleSQL)
                try await Self.pgbench(cluster, ["-i", "-s", "1", "-q"])
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster, mode: "backup-label")
                let installation = try site.quietInstallation()
                let load = try Self.startPgbench(cluster, seconds: 60)
                let result: CheckpointResult
                do {
                    try await Task.sleep(for: .milliseconds(500))
                    result = try await installation.checkpoint(label: "for-dr")
                } catch {
                    load.signal(SIGKILL)
                    load.wait()
                    throw error
                }
                load.signal(SIGINT)
                load.wait()
                try #require(result.error == nil, "\(result.error.map { "\($0)" } ?? "")")
                let files = try #require(result.record.writers.first { $0.name == "pg" }?.recovery?.files)
                let label = try #require(files["backup_label"])
                let stop = try #require(files["backup_stop_lsn"])
                // The segment holding the stop LSN must reach the archive.
                try await cluster.psql("SELECT pg_switch_wal()")
                let segment = try await cluster.psql("SELECT pg_walfile_name('\(stop)')")
                #expect(await eventually(within: .seconds(15)) { FileManager.default.fileExists(atPath: "\(archive)/\(segment)") },
                        "\(segment) was never archived")

                try await Self.withWritableCopy(of: result.record, world: world, index: 0) { copy in
                    let data = copy + "/pg/data"
                    unlink(data + "/postmaster.pid")
                    try label.write(toFile: data + "/backup_label", atomically: false, encoding: .utf8)
                    _ = FileManager.default.createFile(atPath: data + "/recovery.signal", contents: nil)
                    let settings = "\nrestore_command = 'cp \(archive)/%f %p'\nrecovery_target = 'immediate'\n"
                        + "recovery_target_action = 'promote'\narchive_mode = off\n"
                    let handle = try #require(FileHandle(forWritingAtPath: data + "/postgresql.auto.conf"))
                    try handle.seekToEnd()
                    try handle.write(contentsOf: Data(settings.utf8))
                    try handle.close()
                    try PostgresCluster.chownToPostgres(data)
                    let restored = try PostgresCluster(dataDirectory: data, scratch: world.path("restored"))
                    let state = try await restored.running { server in
                        // Ready for reads once consistent; then it promotes (recovery_target_action).
                        let deadline = ContinuousClock.now + .seconds(30)
                        while try await server.psql("SELECT pg_is_in_recovery()") == "t", ContinuousClock.now < deadline {
                            try await Task.sleep(for: .milliseconds(100))
                        }
                        return try await server.psql("SELECT pg_is_in_recovery()::text || ' ' || pg_current_wal_lsn()")
                    }
                    let log = (try? String(contentsOfFile: restored.logFile, encoding: .utf8)) ?? ""
                    #expect(log.contains("starting backup recovery with redo LSN"), "\(log)")
                    #expect(log.contains("consistent recovery state reached"), "\(log)")
                    #expect(log.contains("end LSN \(stop)"), "backup recovery did not end at the kept stop LSN \(stop): \(log)")
                    #expect(log.contains("restored log file"), "no WAL came from the archive: \(log)")
                    #expect(state.hasPrefix("false "), "\(state)")
                    let recovered = log.split(separator: "\n").filter {
                        $0.contains("backup recovery") || $0.contains("consistent recovery") || $0.contains("recovery stopping")
                    }
                    print("postgresql backup-label restore:\n  " + recovered.joined(separator: "\n  "))
                }
            }
        }
    }

    /// A cluster whose WAL directory (initdb --waldir) and a tablespace are symlinked from the data
    /// directory, all on the guest: identify names all three, and verify re-points the copy's
    /// symlinks into the copy, so the server on the copy never writes to the live paths.
    @Test(.enabled(if: worlds))
    func copyWithSeparateWALAndTablespaceNeverTouchesTheLivePaths() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with { world in
            let wal = world.guest + "/pg/wal"
            let tablespace = world.guest + "/pg/tablespace"
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg"),
                                           initdbArguments: ["--waldir=\(wal)"]) { cluster in
                try FileManager.default.createDirectory(atPath: tablespace, withIntermediateDirectories: true)
                try PostgresCluster.chownToPostgres(tablespace)
                try await cluster.psql(Self.roleSQL)
                try await cluster.psql("CREATE TABLESPACE space LOCATION '\(tablespace)'")
                try await cluster.psql("CREATE TABLE placed (id int) TABLESPACE space; INSERT INTO placed SELECT generate_series(1, 1000)")
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster)
                let installation = try site.quietInstallation()
                let writer = try #require(installation.registry().writers.first { $0.name == "pg" })
                let footprint = try await writer.identify()
                #expect(Set(footprint.paths) == [world.guest + "/pg/data", wal, tablespace], "\(footprint.paths)")

                let result = try await installation.checkpoint(label: "symlinks")
                try #require(result.error == nil, "\(result.error.map { "\($0)" } ?? "")")
                let marker = try #require(result.record.writers.first?.marker)
                let liveWAL = try FileManager.default.contentsOfDirectory(atPath: wal).sorted()
                try await Self.withWritableCopy(of: result.record, world: world, index: 0) { copy in
                    let report = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                    #expect(report.ok, "verify: \(report.details.joined(separator: "\n"))")
                    #expect(report.details.contains { $0.hasPrefix("note: data checksums are off") }, "\(report.details)")
                    let repointed = report.details.filter { $0.hasPrefix("re-pointed") }
                    #expect(repointed.count == 2, "\(report.details)")
                    #expect(try FileManager.default.destinationOfSymbolicLink(atPath: copy + "/pg/data/pg_wal") == copy + "/pg/wal")

                    // A marker the copy does not reach fails verify, naming it, and the server is stopped all the same.
                    var ahead = marker
                    ahead["lsn"] = "FF/0"
                    let failed = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: ahead)
                    #expect(!failed.ok)
                    #expect(failed.details.contains { $0.hasPrefix("FAILED: WAL position") && $0.contains("before FF/0") }, "\(failed.details)")
                    #expect(!FileManager.default.fileExists(atPath: copy + "/pg/data/postmaster.pid"), "the server on the copy was left running")
                }
                // The live WAL directory got nothing from the copy's server (its end-of-recovery checkpoint, its timeline).
                let after = try FileManager.default.contentsOfDirectory(atPath: wal).sorted()
                #expect(Set(after).isSuperset(of: liveWAL))
                #expect(!after.contains { $0.hasSuffix(".history") }, "\(after)")
                #expect(try await cluster.psql("SELECT count(*) FROM placed") == "1000")
            }
        }
    }

    /// Bytes changed inside heap pages, their structure left intact: a cluster with data
    /// checksums fails verify on the copy, naming the page; pg_amcheck's structural checks
    /// alone would pass it.
    @Test(.enabled(if: worlds))
    func heapPageDamageInAChecksummedClusterFailsVerify() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg"),
                                           initdbArguments: ["--data-checksums"]) { cluster in
                try await cluster.psql(Self.roleSQL)
                // Rows read once (their hint bits set) and checkpointed: no WAL after the backup
                // starts brings these pages back over the damage during recovery on the copy.
                try await cluster.psql("CREATE TABLE ledger (id int, note text); "
                                       + "INSERT INTO ledger SELECT i, repeat('x', 200) FROM generate_series(1, 5000) i")
                _ = try await cluster.psql("SELECT count(*) FROM ledger")
                try await cluster.psql("CHECKPOINT")
                let relation = try await cluster.psql("SELECT pg_relation_filepath('ledger')")
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster)
                let installation = try site.quietInstallation()
                let writer = try #require(installation.registry().writers.first { $0.name == "pg" })
                let result = try await installation.checkpoint(label: "checksums")
                try #require(result.error == nil, "\(result.error.map { "\($0)" } ?? "")")
                let marker = try #require(result.record.writers.first?.marker)
                try await Self.withWritableCopy(of: result.record, world: world, index: 0) { copy in
                    let intact = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                    #expect(intact.ok, "verify: \(intact.details.joined(separator: "\n"))")
                    #expect(intact.details.contains { $0.hasPrefix("data checksums: on") }, "\(intact.details)")
                }
                try await Self.withWritableCopy(of: result.record, world: world, index: 1) { copy in
                    // Inside the tuples near the end of pages 2…9: line pointers and headers untouched.
                    let fd = open("\(copy)/pg/data/\(relation)", O_WRONLY)
                    #expect(fd >= 0, "no relation file \(relation) in the copy")
                    for page in 2..<10 { _ = pwrite(fd, [UInt8](repeating: 0x5a, count: 64), 64, off_t(page * 8192 + 8000)) }
                    fsync(fd)
                    close(fd)
                    let damaged = try await writer.verify(copy: CopyLayout(mounts: [world.guest: copy]), marker: marker)
                    #expect(!damaged.ok)
                    #expect(damaged.details.contains { $0.hasPrefix("FAILED: pg_amcheck") && $0.contains("checksum") },
                            "\(damaged.details.joined(separator: "\n"))")
                }
            }
        }
    }

    // MARK: clear errors

    /// Wrong password, unreachable server, missing privileges and a data directory outside the
    /// snapshot set each give their own error, naming the fix, at `writers check` and at checkpoint.
    @Test(.enabled(if: worlds))
    func wrongPasswordUnreachableServerMissingPrivilegeAndDataOutsideTheSetEachFailClearly() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql(Self.roleSQL)
                try await cluster.psql("CREATE ROLE weak LOGIN PASSWORD 'weak-secret'; GRANT pg_read_all_settings TO weak;")
                let outside = world.path("outside/tablespace")
                try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
                try PostgresCluster.chownToPostgres(world.path("outside"))
                let site = try TestSite(world)
                let installation = try site.quietInstallation()
                let cases: [(name: String, add: () async throws -> Void, expected: [String])] = [
                    ("wrong-password", { try site.addPostgreSQLWriter("wrong-password", cluster: cluster, password: "not-it") },
                     ["authentication failed", "password authentication failed", "passfile"]),
                    ("unreachable", { try site.addPostgreSQLWriter("unreachable", conninfo: "host=\(world.path("nothing")) port=5 dbname=postgres user=quiesce") },
                     ["the server is unreachable", "start the server"]),
                    ("no-checkpoint-role", { try site.addPostgreSQLWriter("no-checkpoint-role", cluster: cluster, user: "weak", password: "weak-secret") },
                     ["may not run CHECKPOINT", "GRANT pg_checkpoint"]),
                    // Last: a tablespace on a disk that is not in the snapshot set.
                    ("outside-the-set", {
                        try await cluster.psql("CREATE TABLESPACE elsewhere LOCATION '\(outside)'")
                        try site.addPostgreSQLWriter("outside-the-set", cluster: cluster)
                    }, [outside, "on no volume of the snapshot set"]),
                ]
                try FileManager.default.createDirectory(atPath: world.path("nothing"), withIntermediateDirectories: true)
                var messages: [String: String] = [:]
                for item in cases {
                    try await item.add()
                    let checked: String
                    do {
                        _ = try await installation.checkWriter(name: item.name)
                        checked = "(no error)"
                    } catch {
                        checked = "\(error)"
                    }
                    let result = try await installation.checkpoint(label: item.name)
                    let failed = result.error.map { "\($0)" } ?? "(no error)"
                    // And as an operator sees it: `quiesce writers check NAME`.
                    let cli = try await site.runCLI(["writers", "check", item.name], timeout: .seconds(60))
                    #expect(cli.status != 0, "quiesce writers check \(item.name) exited 0: \(cli.stdout)")
                    for text in item.expected {
                        #expect(checked.contains(text), "writers check \(item.name): \(checked)")
                        #expect(failed.contains(text), "checkpoint \(item.name): \(failed)")
                        #expect(cli.stderr.contains(text), "quiesce writers check \(item.name): \(cli.stderr)")
                    }
                    #expect(result.record.outcome == .aborted)
                    #expect(site.snapshotFiles().isEmpty)
                    messages[item.name] = checked
                    print("postgresql \(item.name): \(checked)")
                    try FileManager.default.removeItem(atPath: "\(site.writersDirectory)/\(item.name).toml")
                }
                // Each its own error.
                #expect(Set(messages.values).count == cases.count)
                #expect(!(messages["wrong-password"] ?? "").contains("unreachable"))
                #expect(!(messages["unreachable"] ?? "").contains("authentication"))
                try await cluster.psql("DROP TABLESPACE elsewhere")
            }
        }
    }

    // MARK: a lost session

    /// In backup-label mode, the held session is terminated during the freeze (another writer,
    /// frozen after it, runs pg_terminate_backend): thaw reports the lost session, the checkpoint
    /// aborts at post-snapshot because it has no backup label, and no snapshot is kept.
    @Test(.enabled(if: worlds))
    func sessionLostDuringTheFreezeAbortsTheBackupLabelCheckpoint() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        try await TestWorld.with { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql(Self.roleSQL)
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster, mode: "backup-label")
                let terminate = ([PostgresCluster.bin + "/psql", "-X", "-At"] + cluster.clientArguments
                    + ["-d", "postgres", "-c", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'quiesce pg'"])
                    .map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
                try site.addExecWriter("terminator", order: 10, timeout: "10s", onFreeze: terminate + " >&2")
                let installation = try site.quietInstallation()
                let result = try await installation.checkpoint(label: "lost-session")
                let error = try #require(result.error, "the checkpoint completed without its backup label")
                #expect(error.phase == .postSnapshot, "\(error)")
                #expect("\(error)".contains("no backup label"), "\(error)")
                let thaw = result.thawErrors.map { "\($0)" }.joined(separator: "\n")
                #expect(thaw.contains("was lost during the freeze") && thaw.contains("ended the backup itself"), "thaw errors: \(thaw)")
                #expect(result.record.outcome == .aborted)
                #expect(site.snapshotFiles().isEmpty, "snapshots left: \(site.snapshotFiles())")
                print("postgresql lost session: \(error)\n  thaw: \(thaw)")
                try await cluster.psql("SELECT pg_backup_start('after-lost', true); SELECT lsn FROM pg_backup_stop(false);")
            }
        }
    }

    // MARK: a killed coordinator

    /// `quiesce checkpoint` killed with SIGKILL while the writers are frozen in backup-label mode:
    /// its session dies with it, so the server ends the backup by itself: no quiesce backend is
    /// left and a new backup starts.
    @Test(.enabled(if: worlds))
    func killedCoordinatorLeavesNoBackupInProgress() async throws {
        try TestEnvironment.requireWorlds()
        try PostgresCluster.requireServer()
        _ = try Executables.requireQuiesce()
        try await TestWorld.with { world in
            try await PostgresCluster.with(dataDirectory: world.guest + "/pg/data", scratch: world.path("pg")) { cluster in
                try await cluster.psql(Self.roleSQL)
                let site = try TestSite(world)
                try site.addPostgreSQLWriter("pg", cluster: cluster, mode: "backup-label", timeout: "10s")
                let frozenMark = world.path("frozen")
                try site.addExecWriter("slow", order: 10, timeout: "10s", onFreeze: "touch \(frozenMark); sleep 5")
                let coordinator = try site.startCLI(["checkpoint"])
                let started = await eventually(within: .seconds(20)) { FileManager.default.fileExists(atPath: frozenMark) }
                let during = try await cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'quiesce pg'")
                coordinator.signal(SIGKILL, group: false)
                coordinator.wait()
                try #require(started, "the checkpoint never reached the slow writer's freeze: \(drain(coordinator.stderrFD))")
                #expect(during == "1", "the backup session was not held during the freeze (\(during))")
                let killed = ContinuousClock.now
                var left = "?"
                let gone = await eventually(within: .seconds(11)) {
                    left = (try? runPsqlSync(cluster, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'quiesce%'")) ?? "?"
                    return left == "0"
                }
                #expect(gone, "quiesce's backend is still there \(ContinuousClock.now - killed) after the kill")
                print("postgresql killed coordinator: session gone \(ContinuousClock.now - killed) after SIGKILL")
                try await cluster.psql("SELECT pg_backup_start('after-kill', true); SELECT lsn FROM pg_backup_stop(false);")
                #expect(!FileManager.default.fileExists(atPath: cluster.dataDirectory + "/backup_label"))
                // Let the guard finish the exec writer's duties before the world goes.
                _ = await eventually(within: .seconds(5)) { site.calls("slow").last == "freeze-failed" }
            }
        }
    }

    // MARK: helpers

    static func pgbench(_ cluster: PostgresCluster, _ arguments: [String]) async throws {
        let result = try await ChildProcess.run(PostgresCluster.bin + "/pgbench", arguments + cluster.clientArguments + ["postgres"],
                                                timeout: .seconds(120))
        guard result.succeeded else { throw TestSupportError("pgbench \(arguments): \(result.stderr)") }
    }

    static func startPgbench(_ cluster: PostgresCluster, seconds: Int) throws -> ChildProcess {
        try ChildProcess(PostgresCluster.bin + "/pgbench", ["-c", "2", "-j", "1", "-T", "\(seconds)", "-n"] + cluster.clientArguments + ["postgres"],
                         stdout: .null, stderr: .null)
    }

    /// Clones the checkpoint's snapshot (reflink), attaches it and mounts it writable below the
    /// world, runs `body` with the mount point, then unmounts and detaches.
    static func withWritableCopy(of record: CheckpointRecord, world: TestWorld, index: Int,
                                 _ body: (String) async throws -> Void) async throws {
        let snapshot = try #require(record.snapshots.first)
        let clone = world.datastore + "/clone-\(index).img"
        let copied = try await ChildProcess.run("cp", ["--reflink=always", snapshot.path, clone], timeout: .seconds(60))
        guard copied.succeeded else { throw TestSupportError("cp --reflink: \(copied.stderr)") }
        let device = try await world.attach(clone)
        let mountPoint = world.path("copy-\(index)")
        try await world.mount(device, at: mountPoint, type: "ext4")
        let result: Result<Void, any Error>
        do { result = .success(try await body(mountPoint)) } catch { result = .failure(error) }
        try await world.unmount(mountPoint)
        try await world.detach(device)
        try result.get()
    }
}

/// Commits ids 1, 2, 3… one transaction each, in one psql session (a DO loop with COMMIT),
/// raising a NOTICE with `pg_current_wal_lsn()` after each commit; psql writes the notices to a log.
final class IdInserter: Sendable {
    let process: ChildProcess
    let log: String

    init(_ cluster: PostgresCluster, log: String) throws {
        self.log = log
        let sql = """
            DO $$ DECLARE i bigint := 0; BEGIN LOOP i := i + 1; INSERT INTO ids VALUES (i); COMMIT; \
            RAISE NOTICE 'id % lsn %', i, pg_current_wal_lsn(); PERFORM pg_sleep(0.002); END LOOP; END $$
            """
        let command = ([PostgresCluster.bin + "/psql", "-X", "-q"] + cluster.clientArguments + ["-d", "postgres", "-c", sql])
            .map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
        process = try ChildProcess("/bin/sh", ["-c", "exec \(command) >/dev/null 2>\(log)"], stdout: .null, stderr: .null)
    }

    /// (id, commit LSN) pairs logged so far.
    func committed() -> [(id: Int64, lsn: UInt64)] {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let words = line.split(separator: " ")
            guard let i = words.firstIndex(of: "id"), i + 3 < words.count, words[i + 2] == "lsn",
                  let id = Int64(words[i + 1]), let lsn = lsnValue(String(words[i + 3])) else { return nil }
            return (id, lsn)
        }
    }

    func stop() {
        process.signal(SIGKILL)
        process.wait()
    }
}

/// `16/B374D848` as a number.
func lsnValue(_ text: String) -> UInt64? {
    let parts = text.split(separator: "/")
    guard parts.count == 2, let high = UInt64(parts[0], radix: 16), let low = UInt64(parts[1], radix: 16) else { return nil }
    return high << 32 | low
}

private func ms(_ value: Double?) -> String { value.map { String(format: "%.1f ms", $0) } ?? "-" }

private func runPsqlSync(_ cluster: PostgresCluster, _ sql: String) throws -> String {
    let result = try ChildProcess.runSync(PostgresCluster.bin + "/psql", ["-X", "-At"] + cluster.clientArguments + ["-d", "postgres", "-c", sql],
                                          timeout: .seconds(10))
    return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}

extension TestSite {
    /// A postgresql writer for `cluster` as `user`, its password in a passfile (mode 0600) beside the config.
    fileprivate func addPostgreSQLWriter(_ name: String, cluster: PostgresCluster, user: String = "quiesce",
                                         password: String = "quiesce-secret", mode: String = "checkpoint",
                                         timeout: String = "20s") throws {
        let passfile = "\(etc)/\(name).pgpass"
        try "\(cluster.socketDirectory):\(cluster.port):*:\(user):\(password)\n".write(toFile: passfile, atomically: true, encoding: .utf8)
        chmod(passfile, 0o600)
        try addPostgreSQLWriter(name, conninfo: cluster.conninfo(user: user), passfile: passfile, mode: mode, timeout: timeout)
    }

    fileprivate func addPostgreSQLWriter(_ name: String, conninfo: String, passfile: String? = nil, mode: String = "checkpoint",
                                         timeout: String = "20s") throws {
        var text = """
            name = "\(name)"
            type = "postgresql"
            conninfo = "\(conninfo)"
            mode = "\(mode)"
            timeout = "\(timeout)"
            statement_timeout = "15s"

            """
        if let passfile { text += "passfile = \"\(passfile)\"\n" }
        let file = "\(writersDirectory)/\(name).toml"
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        chmod(file, 0o600)
    }

    /// An installation whose logger only reports warnings.
    fileprivate func quietInstallation() throws -> Installation {
        var logger = Logger(label: "test")
        logger.logLevel = .warning
        return try Installation(configPath: config, guardExecutable: try Executables.requireQuiesce(), logger: logger)
    }
}
