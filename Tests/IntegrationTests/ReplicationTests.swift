import Foundation
import Quiesce
import QuiesceCatalog
import QuiesceCore
import QuiesceSystem
import QuiesceLab
import QuiesceReplication
import QuiesceTestSupport
import Testing

/// Replication as an operator runs it: checkpoints of a live guest filesystem on an XFS
/// datastore, shipped to DR stores on a second XFS filesystem, checked byte for byte.
@Suite(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI), .serialized)
struct ReplicationTests {
    @Test func everyCheckpointArrivesByteIdenticalAtAFileAndAnSSHTargetReadingOnlyWhatChanged() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 256 << 20)) { world in
            try await SSHServer.with { server in
                let site = try TestSite(world)
                let dr = try await mountDRFilesystem(world)
                try site.addTargets("""
                    [[target]]
                    name = "local"
                    url = "file://\(dr)/local"

                    \(server.target("remote", store: "\(dr)/remote", remoteCommand: try Executables.requireQuiesce(),
                                    "compress = \"zstd\""))
                    """)
                var previousSnapshot: String?
                for round in 1...3 {
                    // Churn: new files and rewrites inside existing ones.
                    let written = try churn(world, round: round)
                    let checkpoint = try await site.runCLI(["checkpoint"])
                    #expect(checkpoint.status == 0, "\(checkpoint.stderr)")
                    let result = try await site.runCLI(["replicate", "--json"])
                    #expect(result.status == 0, "replicate: \(result.stderr)")
                    let report = try decodeReport(result.stdout)
                    let id = try #require(try site.installation().listCheckpoints(limit: 1).first?.id)
                    let snapshot = "\(world.volume.snapshotDirectory)/\(id).img"
                    #expect(report.outcomes.map(\.status) == [.applied, .applied])
                    for outcome in report.outcomes {
                        #expect(outcome.checkpoint == id)
                        #expect(outcome.base == (round == 1 ? nil : previousSnapshot.map { ($0 as NSString).lastPathComponent.replacingOccurrences(of: ".img", with: "") }))
                    }
                    let primary = try await digest(snapshot)
                    #expect(try await digest("\(dr)/local/vm1/\(id).img") == primary, "round \(round): local copy differs")
                    #expect(try await digest("\(dr)/remote/vm1/\(id).img") == primary, "round \(round): remote copy differs")
                    let read = report.outcomes[0].bytesRead
                    if round == 1 {
                        // Full stream: allocated data only, far less than the sparse image.
                        #expect(read < world.options.imageSize / 2, "full stream read \(read) bytes")
                    } else {
                        // A delta reads what changed (XFS copy-on-write may round up, ext4 adds its
                        // metadata and journal), never the whole image.
                        #expect(read >= written, "read \(read) bytes for \(written) written")
                        #expect(read < written * 4 + (16 << 20), "read \(read) bytes for \(written) written")
                    }
                    // One read for both targets: both took the same delta.
                    #expect(report.outcomes[0].bytesRead == report.outcomes[1].bytesRead)
                    previousSnapshot = snapshot
                }
                let status = try await site.runCLI(["targets", "status", "--json"])
                #expect(status.status == 0, "\(status.stderr)")
                #expect(status.stdout.contains("\"lagSeconds\""))
                #expect(status.stdout.contains("\"pending\" : false"))

                // An unreachable target: the other still gets the checkpoint, exit 8, and the
                // unreachable one's base is kept through a prune.
                server.stop()
                let heldBase = try #require(try site.installation().listCheckpoints(limit: 1).first?.id)
                _ = try churn(world, round: 4)
                #expect(try await site.runCLI(["checkpoint"]).status == 0)
                let partial = try await site.runCLI(["replicate", "--json"])
                #expect(partial.status == 8, "\(partial.stderr)")
                let outcomes = try decodeReport(partial.stdout).outcomes
                #expect(outcomes.first { $0.target == "local" }?.status == .applied)
                #expect(outcomes.first { $0.target == "remote" }?.status == .failed)
                #expect(partial.stderr.contains("target remote"))
                let prune = try await site.runCLI(["checkpoints", "prune", "--keep", "1"])
                #expect(prune.status == 0, "\(prune.stderr)")
                let left = try site.installation().listCheckpoints(limit: nil).map(\.id)
                #expect(left.count == 2 && left.contains(heldBase), "kept \(left)")
                #expect(FileManager.default.fileExists(atPath: "\(world.volume.snapshotDirectory)/\(heldBase).img"))
            }
        }
    }

    @Test func killedSenderLeavesThePreviousCheckpointAndTheNextRunResumesWhereTheReceiverStopped() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 256 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world, "bandwidth_limit = \"8MiB/s\"")
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            #expect(try await site.runCLI(["replicate"]).status == 0)
            let first = try #require(DRStore(root: store, create: false).latest(volume: "vm1"))

            try randomFile(world.guest + "/bulk", bytes: 48 << 20)
            world.syncGuestsIgnoringErrors()
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let sender = try site.startCLI(["replicate"])
            // Kill it once the receiver has made some of the stream durable.
            let drStore = try DRStore(root: store, create: false)
            let progressed = await eventually(within: .seconds(60), every: .milliseconds(50)) {
                (drStore.partial(volume: "vm1")?.frames ?? 0) >= 2
            }
            #expect(progressed, "the receiver recorded no progress")
            sender.signal(SIGKILL)
            _ = sender.wait()
            // The receiver notices the end of its input and records what it applied.
            #expect(await eventually(within: .seconds(20)) { !receiverRunning(store) })
            #expect(drStore.latest(volume: "vm1") == first, "the store moved on from \(first) without a whole checkpoint")
            let firstSnapshot = "\(world.volume.snapshotDirectory)/\(first).img"
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: first), firstSnapshot))
            let resumeAt = try #require(drStore.partial(volume: "vm1")?.frames)

            let holders = try site.installation().openCatalog().holds().map(\.holder)
            #expect(holders.contains { $0.hasPrefix("replication in progress (pid \(sender.pid)") }, "\(holders)")
            let again = try await site.runCLI(["replicate", "--json"])
            #expect(again.status == 0, "\(again.stderr)")
            // The killed run's hold on the snapshot it was reading is gone.
            #expect(!(try site.installation().openCatalog().holds().map(\.holder)).contains { $0.contains("pid \(sender.pid)") })
            let outcome = try #require(try decodeReport(again.stdout).outcomes.first)
            #expect(outcome.status == .applied)
            #expect(outcome.resumedAtFrame >= resumeAt && resumeAt > 0, "resumed at \(outcome.resumedAtFrame), receiver had \(resumeAt)")
            let id = try #require(outcome.checkpoint)
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: id), "\(world.volume.snapshotDirectory)/\(id).img"))

            // A scrub finds the copy whole; after damage it names the block; a full
            // replication of a new checkpoint gives a clean copy again.
            #expect(try await site.runCLI(["targets", "scrub"]).status == 0)
            let damaged = open(drStore.imagePath(volume: "vm1", checkpoint: id), O_WRONLY)
            _ = pwrite(damaged, [UInt8(0xff), 0xee], 2, 3 << 20 + 17)
            close(damaged)
            let scrub = try await site.runCLI(["targets", "scrub"])
            #expect(scrub.status == 8)
            #expect(scrub.stderr.contains("differ") && scrub.stderr.contains("offset \(3 << 20)"), "\(scrub.stderr)")
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let full = try await site.runCLI(["replicate", "--full", "--json"])
            #expect(full.status == 0, "\(full.stderr)")
            #expect(try decodeReport(full.stdout).outcomes.first?.base == nil)
            #expect(try await site.runCLI(["targets", "scrub"]).status == 0)

            // After a defragmentation: a delta found by comparing every block, not the maps.
            _ = try churn(world, round: 9)
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let compared = try await site.runCLI(["replicate", "--full-compare", "--json"])
            #expect(compared.status == 0, "\(compared.stderr)")
            let comparedOutcome = try #require(try decodeReport(compared.stdout).outcomes.first)
            #expect(comparedOutcome.base != nil && comparedOutcome.bytesRead == 2 * world.options.imageSize,
                    "base \(String(describing: comparedOutcome.base)), read \(comparedOutcome.bytesRead)")
            let comparedID = try #require(comparedOutcome.checkpoint)
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: comparedID), "\(world.volume.snapshotDirectory)/\(comparedID).img"))
        }
    }

    /// A receiver that takes the session and never answers is given up on after the target's
    /// `timeout`, while a receiver whose verify takes longer than that (answering with
    /// keepalives meanwhile) is waited for: `replicate` ends, the healthy target is served.
    @Test func hungReceiverIsGivenUpAfterTheTimeoutWhileASlowVerifyIsWaitedFor() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 64 << 20)) { world in
            try await SSHServer.with { server in
                let site = try TestSite(world)
                let dr = try await mountDRFilesystem(world)
                // A writer whose DR verify takes 3 s: three times the healthy target's timeout.
                let script = world.path("slow-verify")
                try """
                    #!/bin/sh
                    [ "$1" = verify ] && sleep 3
                    exit 0

                    """.write(toFile: script, atomically: true, encoding: .utf8)
                chmod(script, 0o755)
                try """
                    name = "slow"
                    type = "exec"
                    command = "\(script)"
                    volume = "\(world.volume.name)"
                    verify = true

                    """.write(toFile: "\(site.writersDirectory)/slow.toml", atomically: true, encoding: .utf8)
                chmod("\(site.writersDirectory)/slow.toml", 0o600)
                // The hung receiver: reads everything it is sent and never answers.
                let hung = world.path("hung-receiver")
                try "#!/bin/sh\nexec cat > /dev/null\n".write(toFile: hung, atomically: true, encoding: .utf8)
                chmod(hung, 0o755)
                try site.addTargets("""
                    [[target]]
                    name = "healthy"
                    url = "file://\(dr)/healthy"
                    verify = true
                    timeout = "1s"

                    \(server.target("hung", store: "\(dr)/hung", remoteCommand: hung, "timeout = \"2s\""))
                    """)
                _ = try churn(world, round: 1)
                #expect(try await site.runCLI(["checkpoint"]).status == 0)
                let result = try await site.runCLI(["replicate", "--json"])
                #expect(result.status == 8, "\(result.stderr)")
                let outcomes = try decodeReport(result.stdout).outcomes
                let healthy = try #require(outcomes.first { $0.target == "healthy" })
                #expect(healthy.status == .applied && healthy.verified == true, "\(healthy)")
                let failed = try #require(outcomes.first { $0.target == "hung" })
                #expect(failed.status == .failed)
                #expect(failed.error?.contains("target hung sent nothing for 2 s") == true, "\(failed.error ?? "")")
                #expect(result.stderr.contains("target hung"), "\(result.stderr)")
                // The hung receiver's ssh session was ended, not left behind.
                #expect(await eventually(within: .seconds(10)) { processes(commandContaining: hung).isEmpty })
            }
        }
    }

    /// A verify killed midway (a receiver given up on, a crash) leaves its copy mounted with
    /// an application running on it; the next verify in the store cleans that up first.
    @Test func verifyKilledMidwayLeavesNothingAfterTheNextVerify() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 64 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world)
            let (stall, started) = (world.path("stall"), world.path("verify-started"))
            let script = world.path("stalling-verify")
            // While `stall` exists, verify leaves a process working inside the copy and waits.
            try """
                #!/bin/sh
                if [ "$1" = verify ] && [ -e \(stall) ]; then
                    cd "$2" && sleep 120 &
                    touch \(started)
                    wait
                fi
                exit 0

                """.write(toFile: script, atomically: true, encoding: .utf8)
            chmod(script, 0o755)
            try """
                name = "app"
                type = "exec"
                command = "\(script)"
                volume = "\(world.volume.name)"
                verify = true
                timeout = "3m"

                """.write(toFile: "\(site.writersDirectory)/app.toml", atomically: true, encoding: .utf8)
            chmod("\(site.writersDirectory)/app.toml", 0o600)
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint", "--replicate"]).status == 0)

            FileManager.default.createFile(atPath: stall, contents: nil)
            let verifier = try ChildProcess(try Executables.requireQuiesce(), ["dr", "verify", "--store", store],
                                            stdin: .null, stdout: .null, stderr: .null)
            #expect(await eventually(within: .seconds(60)) { FileManager.default.fileExists(atPath: started) }, "verify never ran")
            verifier.signal(SIGKILL, group: false)
            verifier.wait()
            let work = "\(store)/.work"
            #expect(!Mounts.mountPoints(under: work).isEmpty, "the killed verify left no mount: the test proves nothing")
            #expect(!Processes.using(work).isEmpty, "nothing runs on the abandoned copy: the test proves nothing")

            try FileManager.default.removeItem(atPath: stall)
            let again = try await quiesce(["dr", "verify", "--store", store, "--json"])
            #expect(again.status == 0, "\(again.stderr)")
            #expect(again.stdout.contains("unmounted") && again.stdout.contains("killed 1 process"), "\(again.stdout)")
            #expect(Mounts.mountPoints(under: work).isEmpty)
            #expect(Processes.using(work).isEmpty)
            #expect(!LoopDevice.all().contains { $0.backing.hasPrefix(work + "/") })
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: work)) ?? []).isEmpty)
        }
    }

    /// The DR side verifies a checkpoint with the drop-ins it was taken with: writers.d edited
    /// between the checkpoint and its replication changes nothing on the DR side.
    @Test func theDRCopyIsVerifiedWithTheDropInsOfItsCheckpointNotOfItsReplication() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 64 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world, "verify = true")
            let verified = world.path("verified-by")
            func addWriter(_ name: String, verifyExit: Int) throws -> String {
                let script = world.path("\(name)-hook")
                try "#!/bin/sh\n[ \"$1\" = verify ] && { echo \(name) >> \(verified); exit \(verifyExit); }\nexit 0\n"
                    .write(toFile: script, atomically: true, encoding: .utf8)
                chmod(script, 0o755)
                let spec = "\(site.writersDirectory)/\(name).toml"
                try "name = \"\(name)\"\ntype = \"exec\"\ncommand = \"\(script)\"\nvolume = \"\(world.volume.name)\"\nverify = true\n"
                    .write(toFile: spec, atomically: true, encoding: .utf8)
                chmod(spec, 0o600)
                return try String(contentsOfFile: spec, encoding: .utf8)
            }
            let taken = try addWriter("app", verifyExit: 0)
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let id = try #require(try site.installation().listCheckpoints(limit: 1).first?.id)

            // Before it is replicated, the operator replaces the writer with one whose verify fails.
            try FileManager.default.removeItem(atPath: "\(site.writersDirectory)/app.toml")
            _ = try addWriter("late", verifyExit: 1)
            let result = try await site.runCLI(["replicate", "--json"])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(try decodeReport(result.stdout).outcomes.first?.verified == true)
            let manifest = try DRStore(root: store, create: false).manifest(volume: "vm1", checkpoint: id)
            #expect(manifest.environment?.writers.map(\.name) == ["app"])
            #expect(manifest.environment?.writers.first?.text == taken)
            #expect(try String(contentsOfFile: verified, encoding: .utf8) == "app\n")
        }
    }

    /// A DR filesystem that fills up mid-apply: a clear error naming the store, the previous
    /// checkpoint untouched; once there is room, the next run resumes and completes.
    @Test func fullDRFilesystemFailsClearlyKeepsThePreviousCheckpointAndTheNextRunResumes() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 256 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world)
            let dr = (store as NSString).deletingLastPathComponent
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint", "--replicate"]).status == 0)
            let drStore = try DRStore(root: store, create: false)
            let first = try #require(drStore.latest(volume: "vm1"))

            // Leave about 16 MiB free on the DR filesystem, then send a 64 MiB delta.
            var info = statvfs()
            #expect(statvfs(dr, &info) == 0)
            let filler = "\(dr)/filler"
            let free = UInt64(info.f_bavail) * UInt64(info.f_frsize)
            let fd = open(filler, O_WRONLY | O_CREAT, 0o600)
            let allocated = posix_fallocate(fd, 0, off_t(free - (16 << 20)))
            #expect(allocated == 0, "\(String(cString: strerror(allocated)))")
            close(fd)
            try randomFile(world.guest + "/bulk", bytes: 64 << 20)
            world.syncGuestsIgnoringErrors()
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let full = try await site.runCLI(["replicate", "--json"])
            #expect(full.status == 8, "\(full.stderr)")
            #expect(full.stderr.contains("target dr: receiver: DR store: writing ") && full.stderr.contains("No space left on device")
                    && full.stderr.contains("free space on the DR filesystem"), "\(full.stderr)")
            #expect(drStore.latest(volume: "vm1") == first)
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: first),
                                        "\(world.volume.snapshotDirectory)/\(first).img"))

            try FileManager.default.removeItem(atPath: filler)
            let again = try await site.runCLI(["replicate", "--json"])
            #expect(again.status == 0, "\(again.stderr)")
            let outcome = try #require(try decodeReport(again.stdout).outcomes.first)
            #expect(outcome.status == .applied && outcome.resumedAtFrame > 0, "\(outcome)")
            let id = try #require(outcome.checkpoint)
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: id), "\(world.volume.snapshotDirectory)/\(id).img"))
        }
    }

    /// A cron run that overlaps a replication still sending says who is running and exits 75;
    /// `checkpoint --replicate` keeps its checkpoint and says the next run sends it.
    @Test func overlappingReplicationRunsSayWhoIsRunningAndExit75() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 64 << 20)) { world in
            let (site, store) = try await siteWithOneFileTarget(world)
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let running = try CheckpointLock.acquire(catalogPath: site.catalog, holder: "quiesce replicate", purpose: .replication)
            let busy = "another replication is running: pid \(getpid())"
            let replicate = try await site.runCLI(["replicate"])
            #expect(replicate.status == 75 && replicate.stderr.contains(busy), "\(replicate.stderr)")
            let scrub = try await site.runCLI(["targets", "scrub"])
            #expect(scrub.status == 75 && scrub.stderr.contains(busy), "\(scrub.stderr)")
            let both = try await site.runCLI(["checkpoint", "--replicate"])
            #expect(both.status == 75, "\(both.stderr)")
            #expect(both.stderr.contains("completed, but its replication was skipped: \(busy)"), "\(both.stderr)")
            let skipped = try #require(try site.installation().listCheckpoints(limit: 1).first)
            #expect(skipped.outcome == .completed)
            #expect(!FileManager.default.fileExists(atPath: store + "/vm1"), "something was sent meanwhile")

            running.release()
            #expect(try await site.runCLI(["replicate"]).status == 0)
            #expect(try DRStore(root: store, create: false).latest(volume: "vm1") == skipped.id)
        }
    }

    @Test func pipedStreamsForTheWrongBaseOrAlreadyAppliedAreRefusedWithExit65() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 128 << 20)) { world in
            let site = try TestSite(world)
            let dr = try await mountDRFilesystem(world)
            let store = "\(dr)/piped"
            var ids: [String] = []
            for round in 1...3 {
                _ = try churn(world, round: round)
                #expect(try await site.runCLI(["checkpoint"]).status == 0)
                ids.append(try #require(try site.installation().listCheckpoints(limit: 1).first?.id))
            }
            let quiesce = try Executables.requireQuiesce()
            func pipe(_ send: String, _ extra: String = "") async throws -> CommandResult {
                try await ChildProcess.run("/bin/bash", ["-c", "set -o pipefail; \(quiesce) send --config \(site.config) --volume vm1 \(send) \(extra) | \(quiesce) receive --store \(store)"])
            }
            #expect(try await pipe("--checkpoint \(ids[0])").status == 0)
            // A delta from a checkpoint the store does not have.
            let wrongBase = try await pipe("--checkpoint \(ids[2]) --base \(ids[1])")
            #expect(wrongBase.status == 65, "\(wrongBase.stderr)")
            #expect(wrongBase.stderr.contains(ids[1]) && wrongBase.stderr.contains("does not have"))
            #expect(try await pipe("--checkpoint \(ids[1]) --base \(ids[0])", "--compress zstd").status == 0)
            // The first stream again: an old stream replayed.
            let replay = try await pipe("--checkpoint \(ids[0])")
            #expect(replay.status == 65)
            #expect(replay.stderr.contains("nothing changed"))
            let drStore = try DRStore(root: store, create: false)
            #expect(drStore.checkpoints(volume: "vm1") == [ids[0], ids[1]])
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: ids[1]), "\(world.volume.snapshotDirectory)/\(ids[1]).img"))
        }
    }

    @Test func tlsTargetReceivesTheCheckpointAndASenderWithAForeignCertificateIsRefused() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 128 << 20)) { world in
            let site = try TestSite(world)
            let dr = try await mountDRFilesystem(world)
            let certificates = try TestCertificates.make(in: try world.makeDirectory("tls"))
            let port = LoopbackPort.free(fallback: 47420)
            let store = "\(dr)/served"
            // This primary's certificate may send vm1 (and a volume it does not have); the
            // other primary's, from the same CA, only its own volume.
            let server = try startServe(store: store, port: port, certificates: certificates, stderr: .pipe,
                                        ["--allow", "quiesce-test-sender=vm1,vm9", "--allow", "other-primary=vm2"])
            do {
                try await replicateOverTLS(site, world: world, certificates: certificates, port: port, store: store)
            } catch {
                server.signal(SIGKILL)
                _ = server.wait()
                throw error
            }
            server.signal(SIGTERM)
            _ = server.wait()
            // The DR side's operator sees who was refused and why.
            let said = String(decoding: FileHandle(fileDescriptor: server.stderrFD).readDataToEndOfFile(), as: UTF8.self)
            #expect(said.contains("(CN=other-primary): refused:") && said.contains("may not send volume vm1"), "\(said)")
        }
    }

    /// The connection to a `quiesce://` target cut mid-stream (its server killed): the sender
    /// says so (exit 8), the store keeps its previous checkpoint, and once the server is back
    /// the next run resumes from the frames the receiver had made durable.
    @Test func connectionCutMidStreamLeavesThePreviousCheckpointAndTheNextRunResumes() async throws {
        try await TestWorld.with(.init(datastoreSize: 1 << 30, imageSize: 256 << 20)) { world in
            let site = try TestSite(world)
            let dr = try await mountDRFilesystem(world)
            let certificates = try TestCertificates.make(in: try world.makeDirectory("tls"))
            let port = LoopbackPort.free(fallback: 47421)
            let store = "\(dr)/served"
            func serve() throws -> ChildProcess { try startServe(store: store, port: port, certificates: certificates) }
            var server = try serve()
            defer { server.signal(SIGKILL); server.wait() }
            #expect(await eventually(within: .seconds(20)) { SSHServer.accepts(port: port) }, "quiesce serve did not listen")
            try site.addTargets("""
                [[target]]
                name = "dr"
                url = "quiesce://127.0.0.1:\(port)"
                cert = "\(certificates.clientCert)"
                key = "\(certificates.clientKey)"
                ca = "\(certificates.ca)"
                bandwidth_limit = "8MiB/s"
                """)
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint", "--replicate"]).status == 0)
            let drStore = try DRStore(root: store, create: false)
            let first = try #require(drStore.latest(volume: "vm1"))

            try randomFile(world.guest + "/bulk", bytes: 48 << 20)
            world.syncGuestsIgnoringErrors()
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let sender = try site.startCLI(["replicate", "--json"])
            let progressed = await eventually(within: .seconds(60), every: .milliseconds(50)) {
                (drStore.partial(volume: "vm1")?.frames ?? 0) >= 2
            }
            #expect(progressed, "the receiver recorded no progress")
            server.signal(SIGKILL)
            server.wait()
            let cut = try await runBlocking { () -> (Int32, String) in
                let status = sender.wait()
                return (status, String(decoding: FileHandle(fileDescriptor: sender.stderrFD).readDataToEndOfFile(), as: UTF8.self))
            }
            #expect(cut.0 == 8, "\(cut.1)")
            #expect(cut.1.contains("target dr: writing to target dr: the other side closed the connection")
                    && cut.1.contains("the next `quiesce replicate` resumes"), "\(cut.1)")
            #expect(drStore.latest(volume: "vm1") == first, "the store moved on without a whole checkpoint")
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: first), "\(world.volume.snapshotDirectory)/\(first).img"))
            let resumeAt = try #require(drStore.partial(volume: "vm1")?.frames)

            server = try serve()
            #expect(await eventually(within: .seconds(20)) { SSHServer.accepts(port: port) }, "quiesce serve did not listen again")
            let again = try await site.runCLI(["replicate", "--json"])
            #expect(again.status == 0, "\(again.stderr)")
            let outcome = try #require(try decodeReport(again.stdout).outcomes.first)
            #expect(outcome.status == .applied && outcome.resumedAtFrame >= resumeAt && resumeAt > 0,
                    "resumed at \(outcome.resumedAtFrame), receiver had \(resumeAt)")
            let id = try #require(outcome.checkpoint)
            #expect(try await sameBytes(drStore.imagePath(volume: "vm1", checkpoint: id), "\(world.volume.snapshotDirectory)/\(id).img"))
        }
    }

    private func replicateOverTLS(_ site: TestSite, world: TestWorld, certificates: TestCertificates, port: Int,
                                  store: String) async throws {
            #expect(await eventually(within: .seconds(20)) { SSHServer.accepts(port: port) }, "quiesce serve did not listen")
            try site.addTargets("""
                [[target]]
                name = "trusted"
                url = "quiesce://127.0.0.1:\(port)"
                cert = "\(certificates.clientCert)"
                key = "\(certificates.clientKey)"
                ca = "\(certificates.ca)"
                compress = "zstd"

                [[target]]
                name = "impostor"
                url = "quiesce://127.0.0.1:\(port)"
                cert = "\(certificates.rogueClientCert)"
                key = "\(certificates.rogueClientKey)"
                ca = "\(certificates.ca)"

                [[target]]
                name = "neighbour"
                url = "quiesce://127.0.0.1:\(port)"
                cert = "\(certificates.otherClientCert)"
                key = "\(certificates.otherClientKey)"
                ca = "\(certificates.ca)"
                """)
            _ = try churn(world, round: 1)
            #expect(try await site.runCLI(["checkpoint"]).status == 0)
            let id = try #require(try site.installation().listCheckpoints(limit: 1).first?.id)

            let impostor = try await site.runCLI(["replicate", "--target", "impostor"])
            #expect(impostor.status == 8, "\(impostor.stderr)")
            #expect(impostor.stderr.contains("target impostor"))
            #expect(!FileManager.default.fileExists(atPath: "\(store)/vm1"), "the impostor reached the store")

            // A client the CA signed, but not for this volume: refused by name, the store untouched.
            let neighbour = try await site.runCLI(["replicate", "--target", "neighbour"])
            #expect(neighbour.status == 8, "\(neighbour.stderr)")
            #expect(neighbour.stderr.contains("the client CN=other-primary may not send volume vm1"), "\(neighbour.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "\(store)/vm1"), "the neighbour reached the store")

            let trusted = try await site.runCLI(["replicate", "--target", "trusted", "--json"])
            #expect(trusted.status == 0, "\(trusted.stderr)")
            #expect(try decodeReport(trusted.stdout).outcomes.map(\.status) == [.applied])
            #expect(try await sameBytes("\(store)/vm1/\(id).img", "\(world.volume.snapshotDirectory)/\(id).img"))
            let status = try await site.runCLI(["targets", "status", "--json"])
            #expect(status.stdout.contains(id))
    }
}

// MARK: - Helpers

/// `quiesce serve` on 127.0.0.1:`port` for `store`, with the test PKI (`extra`: more arguments).
func startServe(store: String, port: Int, certificates: TestCertificates, stderr: ChildProcess.Stream = .null,
                _ extra: [String] = []) throws -> ChildProcess {
    try ChildProcess(try Executables.requireQuiesce(), [
        "serve", "--listen", "127.0.0.1:\(port)", "--store", store,
        "--cert", certificates.serverCert, "--key", certificates.serverKey, "--client-ca", certificates.ca,
    ] + extra, stdin: .null, stdout: .null, stderr: stderr)
}

/// A second XFS (reflink) filesystem for the DR side, in its own loop device under the world.
func mountDRFilesystem(_ world: TestWorld) async throws -> String {
    let file = world.path("dr.xfs")
    try SparseFile.create(file, size: 1 << 30)
    let device = try await world.attach(file)
    try await Filesystems.makeXFS(device)
    let mountPoint = try world.makeDirectory("dr")
    try await world.mount(device, at: mountPoint)
    return mountPoint
}

/// A site whose one target, "dr", is a file:// store on a DR filesystem of its own (`settings`:
/// more lines of its table). Returns the site and the store's path.
func siteWithOneFileTarget(_ world: TestWorld, _ settings: String = "") async throws -> (TestSite, String) {
    let site = try TestSite(world)
    let store = "\(try await mountDRFilesystem(world))/store"
    try site.addTargets("[[target]]\nname = \"dr\"\nurl = \"file://\(store)\"\n\(settings)")
    return (site, store)
}

extension SSHServer {
    /// A `[[target]]` table for a store on this server, reached as root over ssh://.
    func target(_ name: String, store: String, remoteCommand: String, _ settings: String = "") -> String {
        """
        [[target]]
        name = "\(name)"
        url = "ssh://root@127.0.0.1\(store)"
        ssh_options = [\(clientOptions.map { "\"\($0)\"" }.joined(separator: ", "))]
        remote_command = "\(remoteCommand)"
        \(settings)
        """
    }
}

extension TestSite {
    func addTargets(_ toml: String) throws {
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: config))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(("\n" + toml + "\n").utf8))
        try handle.close()
    }
}

extension TestWorld {
    func syncGuestsIgnoringErrors() { try? syncGuests() }
}

/// Writes new files and rewrites parts of older ones; returns the bytes written.
func churn(_ world: TestWorld, round: Int) throws -> UInt64 {
    var written: UInt64 = 0
    try randomFile("\(world.guest)/file-\(round)", bytes: 4 << 20)
    written += 4 << 20
    if round > 1 {
        let fd = open("\(world.guest)/file-1", O_WRONLY)
        defer { close(fd) }
        for block in stride(from: 0, to: 1024, by: 97) {
            let bytes = (0..<4096).map { _ in UInt8.random(in: 0...255) }
            _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, off_t(block * 4096)) }
            written += 4096
        }
    }
    try world.syncGuests()
    return written
}

func randomFile(_ path: String, bytes count: Int) throws {
    // One read of the kernel's generator: fast, and off the test's few cooperative threads' budget.
    guard let source = FileHandle(forReadingAtPath: "/dev/urandom"),
          let bytes = try source.read(upToCount: count), bytes.count == count else {
        throw POSIXFailure("read /dev/urandom", EIO)
    }
    try bytes.write(to: URL(fileURLWithPath: path))
}

/// Whether two files hold the same bytes (SHA-256 of each, off the cooperative threads).
func sameBytes(_ a: String, _ b: String) async throws -> Bool {
    try await digest(a) == digest(b)
}

/// `fileDigest` on a thread of its own: hashing an image must not hold one of the test
/// process's cooperative threads (other suites' timing depends on them).
func digest(_ path: String) async throws -> String {
    try await runBlocking { try fileDigest(path) }
}

/// SHA-256 of a whole file, streamed.
func fileDigest(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    var digest = SHA256Digest()
    var buffer = [UInt8](repeating: 0, count: 4 << 20)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n >= 0 else { throw POSIXFailure("read \(path)", errno) }
        if n == 0 { break }
        buffer.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }
    return digest.finish().map { String(format: "%02x", $0) }.joined()
}

func decodeReport(_ json: String) throws -> ReplicationReport {
    try JSONDecoder().decode(ReplicationReport.self, from: Data(json.utf8))
}

/// Whether a `quiesce receive` for this store is still running.
func receiverRunning(_ store: String) -> Bool {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.contains { pid in
        guard pid.allSatisfy(\.isNumber), let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let words = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return words.contains("receive") && words.contains(store)
    }
}
