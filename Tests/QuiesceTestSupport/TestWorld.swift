import Foundation
import QuiesceCore
import QuiesceSystem
import QuiesceLab
import Synchronization

/// A small, real world for one integration test, built from loop devices in its own
/// temporary directory and always torn down:
///
/// ```
/// /tmp/quiesce-test-XXXXXX/
///   datastore.img           sparse file → loop → XFS (reflink=1), mounted at datastore/
///   datastore/vm1.img       sparse raw disk image with ext4 → loop → mounted at guest/
///   guest/                  vm1's guest filesystem (freeze it, write to it)
/// ```
///
/// ```swift
/// try await TestWorld.with { world in
///     try Data("hello".utf8).write(to: URL(fileURLWithPath: world.guest + "/greeting"))
///     let provider = ReflinkProvider()
///     try provider.prepare(world.volumes, checkpointID: id)
/// }
/// ```
///
/// Worlds are independent (own directory, files, loop devices and mounts), so tests
/// may build them in parallel. Teardown only ever touches mounts below the world's
/// directory and loop devices whose backing file is below it: what the world, or the
/// code a test ran in it, created.
public struct TestWorld: Sendable {
    /// What to build.
    public struct Options: Sendable {
        /// The datastore's filesystem.
        public enum Datastore: String, Sendable, CaseIterable {
            /// XFS made with `-m reflink=1`: what quiesce's reflink provider needs.
            case xfsReflink = "xfs (reflink=1)"
            /// XFS made with `-m reflink=0`: must be refused.
            case xfsWithoutReflink = "xfs (reflink=0)"
            /// ext4: cannot reflink, must be refused.
            case ext4
            /// btrfs: reflinks (needs mkfs.btrfs).
            case btrfs
        }

        public var datastore: Datastore
        /// Apparent size of the sparse datastore file (XFS needs at least 300 MiB).
        public var datastoreSize: UInt64
        /// One VM image per name, `<datastore>/<name>.img`, in this order.
        public var volumes: [String]
        /// Apparent size of each sparse VM image.
        public var imageSize: UInt64
        /// Attach and mount each image's ext4 guest filesystem (the first at `guest/`,
        /// others at `guest-<name>/`). Without it volumes have no mount.
        public var mountGuests: Bool

        public init(datastore: Datastore = .xfsReflink, datastoreSize: UInt64 = 1 << 30, volumes: [String] = ["vm1"],
                    imageSize: UInt64 = 256 << 20, mountGuests: Bool = true) {
            self.datastore = datastore
            self.datastoreSize = datastoreSize
            self.volumes = volumes
            self.imageSize = imageSize
            self.mountGuests = mountGuests
        }
    }

    public let options: Options
    /// The world's directory, `/tmp/quiesce-test-XXXXXX` (resolved).
    public let root: String
    /// The datastore's backing file, its loop device and where it is mounted.
    public let datastoreFile: String
    public let datastoreDevice: String
    public let datastore: String
    /// The snapshot set: one volume per `options.volumes`.
    public let volumes: [Volume]
    /// Loop device of each mounted guest, by volume name.
    public let guestDevices: [String: String]
    let state: WorldState

    /// The first volume (`vm1` by default).
    public var volume: Volume { volumes[0] }
    /// The first volume's image, `<datastore>/vm1.img`.
    public var image: String { volume.image }
    /// The first volume's guest mount, `<root>/guest`.
    public var guest: String {
        guard let mount = volume.mount else { preconditionFailure("this world was built with mountGuests: false") }
        return mount
    }

    /// The volume called `name`.
    public func volume(named name: String) -> Volume {
        guard let volume = volumes.first(where: { $0.name == name }) else {
            preconditionFailure("no volume \"\(name)\" in this world: \(volumes.map(\.name))")
        }
        return volume
    }

    // MARK: building and tearing down

    /// Builds a world, runs `body` in it, and tears it down in reverse (thaw what is
    /// frozen, unmount, detach loop devices, remove the directory), also when `body`
    /// or the building throws. Loop devices or mounts the test left below the world
    /// are released too, and reported as a failure if `body` succeeded.
    public static func with<T: Sendable>(_ options: Options = .init(),
                                         _ body: @Sendable (TestWorld) async throws -> T) async throws -> T {
        try TestEnvironment.requireWorlds()
        try validate(options)
        await reclaimAbandonedOnce()
        let root = try makeTemporaryDirectory(prefix: "quiesce-test")
        let state = WorldState()
        let result: Result<T, any Error>
        do {
            try writeOwner(root)
            let world = try await build(root: root, options: options, state: state)
            result = .success(try await body(world))
        } catch {
            result = .failure(error)
        }
        let (problems, leaks) = await teardown(root: root, known: state.known)
        switch result {
        case .failure(let error):
            if !problems.isEmpty || !leaks.isEmpty {
                report("tearing down \(root) after a failure", problems + leaks.map { "released leaked \($0)" })
            }
            throw error
        case .success(let value):
            if !problems.isEmpty { throw TestSupportError("tearing down \(root): " + problems.joined(separator: "; ")) }
            if !leaks.isEmpty {
                throw TestSupportError("the test left these in its world (released by the teardown): "
                                       + leaks.joined(separator: ", ")
                                       + " (detach and unmount what the test attaches, or use world.attach/world.mount)")
            }
            return value
        }
    }

    static func validate(_ options: Options) throws {
        let names = options.volumes
        guard !names.isEmpty, Set(names).count == names.count,
              names.allSatisfy({ !$0.isEmpty && !$0.hasPrefix(".") && !$0.contains("/") }) else {
            throw TestSupportError("TestWorld.Options.volumes must be distinct plain names, got \(names)")
        }
        if [.xfsReflink, .xfsWithoutReflink].contains(options.datastore), options.datastoreSize < 300 << 20 {
            throw TestSupportError("an XFS datastore needs at least 300 MiB, got \(options.datastoreSize) bytes")
        }
        if options.datastore == .btrfs, TestEnvironment.locate("mkfs.btrfs") == nil {
            throw TestEnvironmentError(missing: ["mkfs.btrfs not found (apt-get install btrfs-progs)"])
        }
    }

    private static func build(root: String, options: Options, state: WorldState) async throws -> TestWorld {
        let datastoreFile = "\(root)/datastore.img"
        let datastore = "\(root)/datastore"
        try SparseFile.create(datastoreFile, size: options.datastoreSize)
        let datastoreDevice = try await LoopDevice.attach(file: datastoreFile)
        state.remember(datastoreDevice)
        let type: String
        switch options.datastore {
        case .xfsReflink: try await Filesystems.makeXFS(datastoreDevice, reflink: true); type = "xfs"
        case .xfsWithoutReflink: try await Filesystems.makeXFS(datastoreDevice, reflink: false); type = "xfs"
        case .ext4: try await Filesystems.makeExt4(datastoreDevice, label: "datastore"); type = "ext4"
        case .btrfs: try await Filesystems.makeBtrfs(datastoreDevice, label: "datastore"); type = "btrfs"
        }
        state.remember(datastore)
        try await Mounts.mount(device: datastoreDevice, at: datastore, type: type)

        var volumes: [Volume] = []
        var guestDevices: [String: String] = [:]
        for (index, name) in options.volumes.enumerated() {
            let image = "\(datastore)/\(name).img"
            try SparseFile.create(image, size: options.imageSize)
            try await Filesystems.makeExt4(image, label: String(name.prefix(16)))
            var mount: String?
            if options.mountGuests {
                let guest = index == 0 ? "\(root)/guest" : "\(root)/guest-\(name)"
                let device = try await LoopDevice.attach(file: image)
                state.remember(device)
                state.remember(guest)
                try await Mounts.mount(device: device, at: guest, type: "ext4")
                chmod(guest, 0o755)
                guestDevices[name] = device
                mount = guest
            }
            volumes.append(Volume(name: name, image: image, mount: mount))
        }
        return TestWorld(options: options, root: root, datastoreFile: datastoreFile, datastoreDevice: datastoreDevice,
                         datastore: datastore, volumes: volumes, guestDevices: guestDevices, state: state)
    }

    /// Releases everything below `root`, in dependency order: a loop device once
    /// nothing mounts it, a mount once nothing is mounted below it and no loop device
    /// is backed by a file on it. Then removes `root`. Returns the problems, and what
    /// was released that is not in `known` (leaks).
    static func teardown(root: String, known: Set<String>) async -> (problems: [String], leaks: [String]) {
        var problems: [String] = []
        var leaks: [String] = []
        let below = root + "/"
        func inside(_ path: String) -> Bool { path == root || path.hasPrefix(below) }
        func backing(_ path: String) -> String {
            path.hasSuffix(" (deleted)") ? String(path.dropLast(" (deleted)".count)) : path
        }

        for mount in Mounts.mountPoints(under: root) { await thawIfFrozen(mount) }

        var failed = Set<String>()
        var released = Set<String>()
        let giveUp = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < giveUp {
            let mounts = Mounts.mountPoints(under: root)
            let loops = LoopDevice.all().filter { inside(backing($0.backing)) }
            if mounts.isEmpty && loops.isEmpty { break }
            var acted = false
            for loop in loops where !failed.contains(loop.device) && !released.contains(loop.device)
                && Mounts.mountPoints(of: loop.device).isEmpty {
                if !known.contains(loop.device) { leaks.append("loop device \(loop.device) (\(loop.backing))") }
                do {
                    try await LoopDevice.detach(loop.device)
                    released.insert(loop.device)
                    acted = true
                } catch {
                    failed.insert(loop.device)
                    problems.append("\(error)")
                }
            }
            let loopsLeft = LoopDevice.all().filter { inside(backing($0.backing)) }
            for mount in mounts.sorted(by: { $0.count > $1.count }) where !failed.contains(mount) {
                let busy = mounts.contains { $0.hasPrefix(mount + "/") }
                    || loopsLeft.contains { backing($0.backing).hasPrefix(mount + "/") }
                if busy { continue }
                if !known.contains(mount) { leaks.append("mount \(mount) (\(Mounts.source(of: mount) ?? "?"))") }
                do {
                    try await Mounts.unmount(mount)
                    acted = true
                } catch {
                    failed.insert(mount)
                    problems.append("\(error)")
                }
            }
            if !acted {
                // A detached loop device may take a moment to let go of its file; anything else is stuck.
                let settling = loopsLeft.contains { released.contains($0.device) }
                if !settling { break }
                // Not Task.sleep: a cancelled test must still wait here rather than spin.
                await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                    DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(100)) { done.resume() }
                }
            }
        }

        // Last resort for what something (an open file of the test process) keeps busy:
        // detaching a loop device in use marks it to clear itself when its last user
        // goes (do it while its backing path still names our directory), then a lazy
        // unmount takes each filesystem out of the tree; the kernel releases the whole
        // chain when the test process closes its files or exits.
        let busyMounts = Mounts.mountPoints(under: root)
        if !busyMounts.isEmpty {
            for loop in LoopDevice.all() where inside(backing(loop.backing)) {
                try? await LoopDevice.detach(loop.device)
            }
            for mount in busyMounts.sorted(by: { $0.count > $1.count }) {
                do {
                    try await Mounts.unmount(mount, lazily: true)
                    problems.append("\(mount) was busy (an open file or a process working in it?): unmounted lazily")
                } catch {
                    problems.append("\(error)")
                }
            }
        }

        let stillMounted = Mounts.mountPoints(under: root)
        if !stillMounted.isEmpty {
            problems.append("left \(root) in place: still mounted: \(stillMounted.joined(separator: ", ")) "
                            + "(`fuser -vm PATH` shows who holds it; a later test run reclaims the world once it is free)")
            return (problems, leaks)
        }
        do {
            try FileManager.default.removeItem(atPath: root)
        } catch {
            problems.append("cannot remove \(root): \(error)")
        }
        return (problems, leaks)
    }

    // MARK: things a test adds to its world (released by the teardown)

    /// `<root>/<relative>`: a place for a test's own files, on no volume.
    public func path(_ relative: String) -> String { "\(root)/\(relative)" }

    /// Creates `<root>/<relative>` (and parents) and returns its path.
    public func makeDirectory(_ relative: String) throws -> String {
        let path = path(relative)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// Attaches `file` (below the world's directory) to a loop device the teardown will detach.
    public func attach(_ file: String, readOnly: Bool = false) async throws -> String {
        let device = try await LoopDevice.attach(file: file, readOnly: readOnly)
        state.remember(device)
        return device
    }

    /// Mounts `device` at `path` (below the world's directory); the teardown unmounts it.
    public func mount(_ device: String, at path: String, type: String? = nil, options: [String]? = nil) async throws {
        guard path.hasPrefix(root + "/") else {
            throw TestSupportError("world.mount: \(path) is outside the world's directory \(root)")
        }
        state.remember(path)
        try await Mounts.mount(device: device, at: path, type: type, options: options)
    }

    /// Unmounts what the test mounted (thawing it first).
    public func unmount(_ path: String) async throws { try await Mounts.unmount(path) }

    /// Detaches a loop device the test attached.
    public func detach(_ device: String) async throws { try await LoopDevice.detach(device) }

    /// Attaches the image `file` read-only, mounts its filesystem read-only without
    /// replaying its journal (ext4 `noload`; xfs `norecovery,nouuid`) below the world's
    /// directory, runs `body` with the mount point, then unmounts and detaches, also
    /// when `body` throws. For looking at a snapshot's contents.
    public func withMountedCopy<T>(of file: String, type: String = "ext4",
                                   isolation: isolated (any Actor)? = #isolation,
                                   _ body: (String) async throws -> T) async throws -> T {
        let options: [String] = switch type {
        case "ext4", "ext3": ["ro", "noload"]
        case "xfs": ["ro", "norecovery", "nouuid"]
        default: ["ro"]
        }
        let mountPoint = path("copies/\(state.nextCopy())")
        let device = try await attach(file, readOnly: true)
        do {
            try await mount(device, at: mountPoint, type: type, options: options)
        } catch {
            try? await detach(device)
            throw error
        }
        let result: Result<T, any Error>
        do { result = .success(try await body(mountPoint)) } catch { result = .failure(error) }
        do {
            try await unmount(mountPoint)
            try await detach(device)
        } catch {
            if case .success = result { throw error }
        }
        return try result.get()
    }

    /// syncfs of every mounted guest filesystem: what the test wrote is in the images.
    public func syncGuests() throws {
        for mount in volumes.compactMap(\.mount) {
            let fd = try FilesystemHold.open(mount)
            defer { close(fd) }
            try FilesystemHold.sync(fd, mount: mount)
        }
    }

    // MARK: abandoned worlds

    /// Each world records its process (pid and start time) in `<root>/.owner`, so that
    /// a later run can release worlds whose test process died (crash, `kill -9`).
    static func writeOwner(_ root: String) throws {
        guard let start = processStartTime(getpid()) else { return }
        try "\(getpid()) \(start)\n".write(toFile: "\(root)/.owner", atomically: true, encoding: .utf8)
    }

    static func processStartTime(_ pid: pid_t) -> String? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // Field 22 (starttime); fields[0] is field 3 (state).
        return fields.count > 19 ? String(fields[19]) : nil
    }

    private static let reclaimed = Mutex(false)

    /// Once per process: tear down `/tmp/quiesce-test-*` worlds whose owning process is gone.
    static func reclaimAbandonedOnce() async {
        let first = reclaimed.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []
        for entry in entries where entry.hasPrefix("quiesce-test-") {
            let root = "/tmp/\(entry)"
            guard let owner = try? String(contentsOfFile: "\(root)/.owner", encoding: .utf8) else { continue }
            let parts = owner.split(whereSeparator: \.isWhitespace)
            guard parts.count == 2, let pid = pid_t(parts[0]) else { continue }
            if processStartTime(pid) == String(parts[1]) { continue }  // still running
            let (problems, leaks) = await teardown(root: root, known: [])
            report("reclaimed abandoned test world \(root)", problems + leaks.map { "released \($0)" })
        }
    }

    static func report(_ title: String, _ lines: [String]) {
        let text = ([title + ":"] + lines.map { "  - \($0)" }).joined(separator: "\n") + "\n"
        FileHandle.standardError.write(Data(text.utf8))
    }
}

/// What a world created (to tell its own resources from leaks) and counters.
final class WorldState: Sendable {
    private struct State {
        var known: Set<String> = []
        var copies = 0
    }
    private let state = Mutex(State())

    func remember(_ resource: String) { state.withLock { _ = $0.known.insert(resource) } }
    var known: Set<String> { state.withLock { $0.known } }
    func nextCopy() -> Int { state.withLock { $0.copies += 1; return $0.copies } }
}
