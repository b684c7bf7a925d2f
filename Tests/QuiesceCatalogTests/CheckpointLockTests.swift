import Foundation
import QuiesceCore
import Testing
@testable import QuiesceCatalog

@Suite("Checkpoint lock: one checkpoint at a time per catalog")
struct CheckpointLockTests {
    @Test func secondCheckpointInTheSameProcessIsRefusedNamingTheFirst() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = "\(dir)/var/lib/quiesce/catalog.db"
            let before = Date().addingTimeInterval(-1)
            let lock = try CheckpointLock.acquire(catalogPath: catalog, holder: "quiesce checkpoint --label nightly")
            #expect(lock.path == "\(catalog).lock")

            let held = try #require(throws: CheckpointLock.Held.self) {
                try CheckpointLock.acquire(catalogPath: catalog, holder: "quiesce checkpoints prune")
            }
            #expect(held.pid == getpid())
            #expect(held.holder == "quiesce checkpoint --label nightly")
            let since = try #require(held.since)
            #expect(since >= before && since <= Date().addingTimeInterval(1))
            let expected = "another checkpoint is running: pid \(getpid()) since \(since.formatted(.iso8601))"
                + " (quiesce checkpoint --label nightly), lock \(catalog).lock"
            #expect(held.description == expected)

            lock.release()
            lock.release() // idempotent
            let next = try CheckpointLock.acquire(catalogPath: catalog, holder: "quiesce checkpoints prune")
            next.release()
        }
    }

    @Test func lockFileIsPrivateAndNamesOnlyTheCurrentHolder() async throws {
        try await withTemporaryDirectory { dir in
            let lock = try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "quiesce checkpoint\n--label x")
            var info = stat()
            #expect(stat(lock.path, &info) == 0 && info.st_mode & 0o777 == 0o600)
            let text = try String(contentsOfFile: lock.path, encoding: .utf8)
            #expect(text.hasPrefix("pid \(getpid())\nsince "))
            #expect(text.hasSuffix("\nholder quiesce checkpoint --label x\n"))
            lock.release()
            #expect(try String(contentsOfFile: lock.path, encoding: .utf8).isEmpty)
        }
    }

    @Test func droppedLockIsReleased() async throws {
        try await withTemporaryDirectory { dir in
            do {
                _ = try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "first")
            }
            try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "second").release()
        }
    }

    @Test func anotherProcessCannotTakeTheLockWhileACheckpointRuns() async throws {
        try await withTemporaryDirectory { dir in
            let lock = try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "quiesce checkpoint")
            let whileHeld = try ChildProcess.runSync("flock", ["-n", lock.path, "true"], timeout: .seconds(10))
            #expect(whileHeld.status == 1)
            lock.release()
            let afterRelease = try ChildProcess.runSync("flock", ["-n", lock.path, "true"], timeout: .seconds(10))
            #expect(afterRelease.status == 0)
        }
    }

    /// A writer may start a daemon (`pg_ctl start`) during a checkpoint: it must not keep the lock alive.
    @Test func processStartedDuringACheckpointDoesNotInheritTheLock() async throws {
        try await withTemporaryDirectory { dir in
            let lock = try CheckpointLock.acquire(catalogPath: "\(dir)/catalog.db", holder: "quiesce checkpoint")
            defer { lock.release() }
            let daemon = try ChildProcess("sleep", ["600"], stdout: .null, stderr: .null)
            defer {
                daemon.signal(SIGKILL)
                daemon.wait()
            }
            let descriptors = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(daemon.pid)/fd")
            let targets = descriptors.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(daemon.pid)/fd/\($0)") }
            #expect(!targets.isEmpty)
            #expect(!targets.contains(lock.path), "the child holds \(lock.path) open: \(targets)")
        }
    }

    @Test func lockOfAKilledHolderIsFreeAtOnce() async throws {
        try await withTemporaryDirectory { dir in
            let catalog = "\(dir)/catalog.db"
            // A stale description from an earlier holder must not matter either.
            try "pid 999999\nsince 2026-11-25T12:00:00Z\nholder quiesce checkpoint --label old\n"
                .write(toFile: "\(catalog).lock", atomically: false, encoding: .utf8)
            // `flock --no-fork`: one process holds the lock (flock execs `sleep` with the locked
            // descriptor), so once it is reaped the kernel has closed every copy of the descriptor.
            let holder = try ChildProcess("flock", ["--no-fork", CheckpointLock.lockPath(forCatalog: catalog), "sleep", "600"],
                                          stdout: .null, stderr: .null)
            defer {
                holder.signal(SIGKILL)
                holder.wait()
            }
            // Wait until the other process holds it.
            var refused: CheckpointLock.Held?
            for _ in 0..<500 where refused == nil {
                do {
                    try CheckpointLock.acquire(catalogPath: catalog, holder: "probe").release()
                    try await Task.sleep(for: .milliseconds(10))
                } catch let held as CheckpointLock.Held {
                    refused = held
                }
            }
            #expect(refused != nil, "the flock process never took the lock")
            // The stale words in the file are not passed off as the holder.
            #expect(refused?.pid == nil)
            #expect(refused?.description == "another checkpoint is running: holder unknown, lock \(catalog).lock")

            holder.signal(SIGKILL)
            #expect(holder.wait() == 128 + SIGKILL)
            let lock = try CheckpointLock.acquire(catalogPath: catalog, holder: "quiesce checkpoint --label next")
            defer { lock.release() }
            #expect(try String(contentsOfFile: lock.path, encoding: .utf8).contains("pid \(getpid())\n"))
        }
    }
}
