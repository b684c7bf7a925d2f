import Foundation
import QuiesceCore
import QuiesceTestSupport
import ReflinkProvider
import Testing

private let worlds = TestEnvironment.canBuildWorlds || TestEnvironment.isCI
private let btrfsWorlds = TestEnvironment.canBuildWorlds && TestEnvironment.locate("mkfs.btrfs") != nil

/// The reflink provider against real XFS, ext4 and btrfs datastores on loop devices.
@Suite("Reflink provider", .serialized)
struct ReflinkProviderTests {
    let provider = ReflinkProvider()

    /// A fragmented image (random writes into a sparse file) gets a warning before the
    /// checkpoint, naming the extent count, the estimated clone time and the fix; a hold
    /// limit with room for it gets none.
    @Test(.enabled(if: worlds))
    func fragmentedImageIsWarnedAboutBeforeItsCloneEatsTheHoldWindow() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(mountGuests: false)) { world in
            let image = world.datastore + "/fragmented.img"
            let fd = open(image, O_RDWR | O_CREAT, 0o600)
            ftruncate(fd, 1 << 30)
            var generator = SystemRandomNumberGenerator()
            let block = [UInt8](repeating: 0x5a, count: 4096)
            for _ in 0..<3000 {
                _ = pwrite(fd, block, 4096, off_t(UInt64.random(in: 0..<(1 << 18), using: &generator) * 4096))
            }
            fsync(fd)
            close(fd)
            let volume = Volume(name: "fragmented", image: image, mount: nil)
            let risks = ReflinkProvider().holdWindowRisks([volume], holdTimeout: .milliseconds(100))
            let risk = try #require(risks.first, "no warning for 3000 random writes")
            #expect(risk.contains("volume \"fragmented\"") && risk.contains("extents") && risk.contains("xfs_fsr"), "\(risk)")
            #expect(ReflinkProvider().holdWindowRisks([volume], holdTimeout: .seconds(10)).isEmpty)
        }
    }

    @Test(.enabled(if: worlds))
    func snapshotSharesEveryExtentWithTheLiveImage() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            try writeFile(world.guest + "/data.bin", pattern(seed: 1, count: 4 << 20))
            try world.syncGuests()
            let id = "20260101T000000001Z"
            try provider.prepare(world.volumes, checkpointID: id)
            var atCapture: (image: [Extent], clone: [Extent]) = ([], [])
            let captured = try capturingWhileFrozen(world, id: id) { captured in
                atCapture = (try ExtentMap.extents(of: world.image), try ExtentMap.extents(of: captured[0].pendingPath))
            }
            let files = try provider.commit(captured)

            // Every block of data of the image is shared, not copied. (Unwritten extents,
            // which read as zeros, become holes in the clone.)
            let imageData = ExtentMap.dataBytes(atCapture.image)
            #expect(imageData > 4 << 20, "the image holds at least the 4 MiB written")
            #expect(ExtentMap.sharedBytes(atCapture.image, atCapture.clone) == imageData)
            #expect(ExtentMap.dataBytes(atCapture.clone) == imageData)
            // Committing moves the clone without rewriting it. (Its extents may be split
            // differently by now: the thawed guest rewrote its superblock in the live image.)
            let committed = try ExtentMap.extents(of: files[0].path)
            #expect(ExtentMap.sharedBytes(committed, atCapture.clone) == imageData)
        }
    }

    @Test(.enabled(if: worlds))
    func snapshotHoldsExactlyTheDataWrittenBeforeIt() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let before = pattern(seed: 2, count: 4 << 20), after = pattern(seed: 3, count: 4 << 20)
            let file = world.guest + "/data.bin"
            try writeFile(file, before)
            try world.syncGuests()
            let id = "20260101T000000002Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let snapshot = try provider.commit(try capturingWhileFrozen(world, id: id))[0]

            // Overwrite the same bytes in place: the guest rewrites the same image blocks.
            try writeFile(file, after, truncate: false)
            try world.syncGuests()
            #expect(try readFile(file) == after)

            let seen = try await world.withMountedCopy(of: snapshot.path) { copy in try readFile(copy + "/data.bin") }
            #expect(seen == before, "the snapshot still holds the data written before it")

            // The live image diverged from the snapshot by at least what was overwritten.
            let image = try ExtentMap.extents(of: world.image), clone = try ExtentMap.extents(of: snapshot.path)
            let diverged = ExtentMap.dataBytes(clone) - ExtentMap.sharedBytes(image, clone)
            #expect(diverged >= 4 << 20)
        }
    }

    @Test(.enabled(if: worlds))
    func committedSnapshotIsReadOnlyAndNamedAfterTheCheckpoint() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let id = "20260101T000000003Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let files = try provider.commit(try capturingWhileFrozen(world, id: id))

            let expected = "\(world.volume.snapshotDirectory)/\(id).img"
            #expect(files == [SnapshotFile(volume: "vm1", image: world.image, path: expected,
                                           sizeBytes: world.options.imageSize)])
            #expect(try mode(of: expected) == 0o400)
            #expect(try mode(of: world.volume.snapshotDirectory) == 0o700)
            #expect(!exists(expected + ".partial"))
            #expect(try FileManager.default.contentsOfDirectory(atPath: world.volume.snapshotDirectory) == ["\(id).img"])
        }
    }

    @Test(.enabled(if: worlds))
    func ext4DatastoreIsRefusedWithTheFixAndLeavesNothingBehind() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(datastore: .ext4)) { world in
            let error = #expect(throws: ProviderError.self) {
                try provider.prepare(world.volumes, checkpointID: "20260101T000000004Z")
            }
            let text = error.map(String.init(describing:)) ?? ""
            #expect(text.contains("volume \"vm1\""))
            #expect(text.contains("ext4"))
            #expect(text.contains("mkfs.xfs -m reflink=1"))
            #expect(text.contains("btrfs"))
            #expect(!exists(world.datastore + "/.quiesce"))
            let left = try FileManager.default.contentsOfDirectory(atPath: world.datastore).sorted()
            #expect(left == ["lost+found", "vm1.img"])
        }
    }

    @Test(.enabled(if: worlds))
    func xfsWithoutReflinkIsRefusedWithTheFix() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(datastore: .xfsWithoutReflink)) { world in
            let error = #expect(throws: ProviderError.self) {
                try provider.prepare(world.volumes, checkpointID: "20260101T000000005Z")
            }
            let text = error.map(String.init(describing:)) ?? ""
            #expect(text.contains("xfs without reflink"))
            #expect(text.contains("mkfs.xfs -m reflink=1"))
            #expect(!exists(world.datastore + "/.quiesce"))
        }
    }

    @Test(.enabled(if: worlds))
    func snapshotDirectoryOnAnotherFilesystemIsRefused() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let elsewhere = world.path("elsewhere/vm1")
            let volume = Volume(name: "vm1", image: world.image, mount: world.guest, snapshotDirectory: elsewhere)
            let error = #expect(throws: ProviderError.self) {
                try provider.prepare([volume], checkpointID: "20260101T000000006Z")
            }
            let text = error.map(String.init(describing:)) ?? ""
            #expect(text.contains(elsewhere) && text.contains(world.image))
            #expect(text.contains("same filesystem"))
            #expect(!exists(world.path("elsewhere")), "prepare removes the directories it created")
        }
    }

    @Test(.enabled(if: worlds))
    func discardRemovesPendingAndCommittedSnapshots() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let committed = "20260101T000000007Z", pending = "20260101T000000008Z"
            try provider.prepare(world.volumes, checkpointID: committed)
            let files = try provider.commit(try capturingWhileFrozen(world, id: committed))
            try provider.prepare(world.volumes, checkpointID: pending)
            let captured = try capturingWhileFrozen(world, id: pending)
            #expect(exists(files[0].path) && exists(captured[0].pendingPath))

            try provider.discard(world.volumes, checkpointID: committed)
            try provider.discard(world.volumes, checkpointID: pending)
            #expect(!exists(files[0].path))
            #expect(!exists(captured[0].pendingPath))
            #expect(try FileManager.default.contentsOfDirectory(atPath: world.volume.snapshotDirectory).isEmpty)
            // Nothing left to discard is not an error.
            try provider.discard(world.volumes, checkpointID: committed)
        }
    }

    @Test(.enabled(if: worlds))
    func secondCaptureWithTheSameCheckpointIDIsRefused() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let id = "20260101T000000009Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let first = try provider.commit(try capturingWhileFrozen(world, id: id))[0]
            var before = stat()
            stat(first.path, &before)

            let prepareError = #expect(throws: ProviderError.self) { try provider.prepare(world.volumes, checkpointID: id) }
            #expect(prepareError.map(String.init(describing:))?.contains("already exists") == true)
            #expect(throws: ProviderError.self) { _ = try provider.capture(world.volumes, checkpointID: id) }

            var after = stat()
            stat(first.path, &after)
            #expect(after.st_ino == before.st_ino && after.st_size == before.st_size)
            #expect(try mode(of: first.path) == 0o400)
            #expect(!exists(first.path + ".partial"))
        }
    }

    @Test(.enabled(if: worlds))
    func failedCaptureRemovesWhatItCreated() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let id = "20260101T000000010Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let gone = Volume(name: "vm2", image: world.datastore + "/vm2.img", mount: nil,
                              snapshotDirectory: world.volume.snapshotDirectory + "-vm2")
            let error = #expect(throws: ProviderError.self) {
                _ = try provider.capture([world.volume, gone], checkpointID: id)
            }
            #expect(error?.volume == "vm2")
            #expect(try FileManager.default.contentsOfDirectory(atPath: world.volume.snapshotDirectory).isEmpty)
        }
    }

    @Test(.enabled(if: worlds))
    func everyVolumeOfTheSetIsCapturedTogether() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(volumes: ["vm1", "vm2"], imageSize: 64 << 20)) { world in
            for (index, volume) in world.volumes.enumerated() {
                try writeFile(volume.mount! + "/which", Array("volume \(index)".utf8))
            }
            try world.syncGuests()
            let id = "20260101T000000011Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let files = try provider.commit(try capturingWhileFrozen(world, id: id))
            #expect(files.map(\.volume) == ["vm1", "vm2"])
            for (index, file) in files.enumerated() {
                let seen = try await world.withMountedCopy(of: file.path) { try readFile($0 + "/which") }
                #expect(seen == Array("volume \(index)".utf8))
            }
            try provider.delete(files[1])
            #expect(!exists(files[1].path) && exists(files[0].path))
            try provider.delete(files[1])  // already gone is fine
        }
    }

    @Test(.enabled(if: btrfsWorlds))
    func btrfsDatastoreTakesSnapshots() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with(.init(datastore: .btrfs)) { world in
            let data = pattern(seed: 4, count: 1 << 20)
            try writeFile(world.guest + "/data.bin", data)
            try world.syncGuests()
            let id = "20260101T000000012Z"
            try provider.prepare(world.volumes, checkpointID: id)
            let snapshot = try provider.commit(try capturingWhileFrozen(world, id: id))[0]
            try writeFile(world.guest + "/data.bin", pattern(seed: 5, count: 1 << 20), truncate: false)
            try world.syncGuests()
            let seen = try await world.withMountedCopy(of: snapshot.path) { try readFile($0 + "/data.bin") }
            #expect(seen == data)
        }
    }

    @Test(.enabled(if: worlds))
    func deleteRefusesTheLiveImage() async throws {
        try TestEnvironment.requireWorlds()
        try await TestWorld.with { world in
            let bogus = SnapshotFile(volume: "vm1", image: world.image, path: world.image, sizeBytes: 0)
            #expect(throws: ProviderError.self) { try provider.delete(bogus) }
            #expect(exists(world.image))
        }
    }

    /// What the coordinator does around `capture`: syncfs and FIFREEZE every guest,
    /// capture, then FITHAW (always). `whileFrozen` runs before the thaw.
    func capturingWhileFrozen(_ world: TestWorld, id: String,
                              whileFrozen: ([CapturedSnapshot]) throws -> Void = { _ in }) throws -> [CapturedSnapshot] {
        var held: [(Int32, String)] = []
        defer {
            for (fd, mount) in held.reversed() {
                _ = try? FilesystemHold.thaw(fd, mount: mount)
                close(fd)
            }
        }
        for mount in world.volumes.compactMap(\.mount) {
            let fd = try FilesystemHold.open(mount)
            held.append((fd, mount))
            try FilesystemHold.sync(fd, mount: mount)
            try FilesystemHold.freeze(fd, mount: mount)
        }
        let captured = try provider.capture(world.volumes, checkpointID: id)
        try whileFrozen(captured)
        return captured
    }
}

/// Sparse-extent arithmetic, no filesystem needed.
@Suite("Extent map")
struct ExtentMapTests {
    @Test func identicalMapsShareEverything() {
        let map = [Extent(logical: 0, physical: 4096, length: 8192), Extent(logical: 65536, physical: 1 << 20, length: 4096)]
        #expect(ExtentMap.sharedBytes(map, map) == 12288)
        #expect(ExtentMap.allocatedBytes(map) == 12288)
    }

    @Test func differentSplitsOfTheSameBlocksAreShared() {
        let a = [Extent(logical: 0, physical: 100_000, length: 12288)]
        let b = [Extent(logical: 0, physical: 100_000, length: 4096), Extent(logical: 4096, physical: 104_096, length: 8192)]
        #expect(ExtentMap.sharedBytes(a, b) == 12288)
    }

    @Test func aRewrittenRangeIsNotShared() {
        let a = [Extent(logical: 0, physical: 100_000, length: 12288)]
        let b = [Extent(logical: 0, physical: 100_000, length: 4096), Extent(logical: 4096, physical: 900_000, length: 4096),
                 Extent(logical: 8192, physical: 108_192, length: 4096)]
        #expect(ExtentMap.sharedBytes(a, b) == 8192)
    }

    @Test func sameBlocksAtAnotherOffsetAreNotShared() {
        let a = [Extent(logical: 0, physical: 100_000, length: 4096)]
        let b = [Extent(logical: 4096, physical: 100_000, length: 4096)]
        #expect(ExtentMap.sharedBytes(a, b) == 0)
    }

    @Test func extentsWithoutAKnownAddressAreNeverShared() {
        let delalloc = Extent(logical: 0, physical: 0, length: 4096, flags: 0x4 /* DELALLOC */)
        #expect(ExtentMap.sharedBytes([delalloc], [delalloc]) == 0)
    }

    @Test func aHoleInOneFileIsNotShared() {
        let a = [Extent(logical: 0, physical: 100_000, length: 8192)]
        let b = [Extent(logical: 4096, physical: 104_096, length: 4096)]
        #expect(ExtentMap.sharedBytes(a, b) == 4096)
    }
}

// MARK: helpers

/// `count` deterministic pseudo-random bytes.
private func pattern(seed: UInt64, count: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

/// Writes `bytes` at offset 0 (truncating first unless told not to) and fsyncs.
private func writeFile(_ path: String, _ bytes: [UInt8], truncate: Bool = true) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0o644)
    guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
    defer { close(fd) }
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + offset, $0.count - offset, off_t(offset)) }
        guard n > 0 else { throw POSIXFailure("write \(path)", errno) }
        offset += n
    }
    guard fsync(fd) == 0 else { throw POSIXFailure("fsync \(path)", errno) }
}

private func readFile(_ path: String) throws -> [UInt8] {
    guard let data = FileManager.default.contents(atPath: path) else { throw POSIXFailure("read \(path)", errno) }
    return [UInt8](data)
}

private func mode(of path: String) throws -> mode_t {
    var info = stat()
    guard stat(path, &info) == 0 else { throw POSIXFailure("stat \(path)", errno) }
    return info.st_mode & 0o7777
}

private func exists(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0
}
