import Foundation
import Logging
import QuiesceCore
import QuiesceDR
import QuiesceReplication
import QuiesceSystem

/// The embedded default: a whole quiesce world on one machine, from loop devices.
/// `up` builds it idempotently, `down` removes exactly what it built (also after a crash
/// half-way or while frozen), `status` says what is there.
public struct Lab: Sendable {
    public var layout: LabLayout
    public var sizes: LabSizes
    public var applications: [any LabApplication]
    public var logger: Logger

    public init(root: String, sizes: LabSizes = LabSizes(), applications: [any LabApplication] = Lab.defaultApplications,
                logger: Logger) {
        self.layout = LabLayout(root: root)
        self.sizes = sizes
        self.applications = applications
        self.logger = logger
    }

    /// The applications of the lab, in the order they are set up.
    public static let defaultApplications: [any LabApplication] = [
        ExecHookLabApplication(),
        SQLiteLabApplication(),
        PostgreSQLLabApplication(),
        MailboxLabApplication(),
    ]

    static let requiredTools = ["losetup", "mount", "umount", "mkfs.xfs", "mkfs.ext4"]

    // MARK: up

    public func up() async throws {
        guard getuid() == 0 else { throw LabError("the lab needs root (loop devices, mounts, FIFREEZE): run it with sudo") }
        let missing = (Self.requiredTools + applications.flatMap(\.requiredTools)).filter { !Self.toolExists($0) }
        guard missing.isEmpty else {
            throw LabError("missing tools: \(missing.joined(separator: ", ")) (apt-get install xfsprogs e2fsprogs util-linux sqlite3; the README's demo command does this)")
        }
        let l = layout
        for directory in [l.root, l.datastore, l.guest, l.dr, l.state, l.writersDirectory, l.hooks, l.logs, l.scratch] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        chmod(l.root, 0o755)
        try await ensureFilesystem(file: l.datastoreFile, size: sizes.datastoreBytes, mountPoint: l.datastore, kind: .xfs)
        try await ensureFilesystem(file: l.image, size: sizes.imageBytes, mountPoint: l.guest, kind: .ext4)
        try await ensureFilesystem(file: l.drFile, size: sizes.drBytes, mountPoint: l.dr, kind: .xfs)
        try writeConfiguration()
        for application in applications {
            logger.info("setting up \(application.name)")
            try await application.setUp(l)
        }
        logger.info("lab is up", metadata: ["dir": "\(l.root)", "guest": "\(l.guest)"])
    }

    enum FilesystemKind { case xfs, ext4 }

    /// Creates (once), attaches and mounts a filesystem image, skipping what is already done.
    func ensureFilesystem(file: String, size: UInt64, mountPoint: String, kind: FilesystemKind) async throws {
        if Mounts.isMounted(mountPoint) { return }
        let formattedMark = "\(layout.state)/\((file as NSString).lastPathComponent).formatted"
        if !FileManager.default.fileExists(atPath: formattedMark) {
            try SparseFile.create(file, size: size)
            switch kind {
            case .xfs: try await Filesystems.makeXFS(file, reflink: true)
            case .ext4: try await Filesystems.makeExt4(file, label: "guest")
            }
            FileManager.default.createFile(atPath: formattedMark, contents: nil)
        }
        // A loop left attached by a crashed `up` is reused, not duplicated.
        var device = try await LoopDevice.devices(backing: file).first
        if device == nil { device = try await LoopDevice.attach(file: file, readOnly: false) }
        try await Mounts.mount(device: device!, at: mountPoint, type: kind == .xfs ? "xfs" : "ext4", options: nil)
    }

    func writeConfiguration() throws {
        let l = layout
        let text = """
            # Written by `quiesce lab up`. quiesce's own files (catalog, writers.d) are outside the guest:
            # the guest filesystem is frozen during checkpoints.
            [coordinator]
            catalog = "\(l.catalog)"
            writers_dir = "\(l.writersDirectory)"
            freeze_timeout = "30s"
            hold_timeout = "10s"

            [[volume]]
            name = "\(LabLayout.volumeName)"
            image = "\(l.image)"
            mount = "\(l.guest)"
            provider = "reflink"

            # The DR site, on its own XFS filesystem: every received checkpoint is verified
            # (its applications started on a private clone) as it lands.
            [[target]]
            name = "\(LabLayout.targetName)"
            url = "file://\(l.drStore)"
            verify = true
            keep = 5

            """
        try text.write(toFile: l.config, atomically: true, encoding: .utf8)
    }

    // MARK: down

    /// Stops what the lab started, thaws, unmounts, detaches its loop devices and removes its directory.
    /// Only loop devices backed by files under the lab's directory and mounts under it are touched.
    public func down() async throws {
        let l = layout
        guard FileManager.default.fileExists(atPath: l.root) else { return }
        await stopStrayWorkloads()
        // A DR test on the lab's store runs servers on a mounted clone: stop it first.
        if let store = try? DRStore(root: l.drStore, create: false) {
            do { _ = try await DRTest(store: store).stop() } catch {
                logger.warning("stopping the DR test on \(l.drStore): \(error)")
            }
        }
        for application in applications.reversed() { await application.tearDown(l) }

        // Nothing may stay frozen: a frozen guest would hang every step below.
        for mount in Mounts.mountPoints(under: l.root) { await thawIfFrozen(mount) }
        let problems = await releaseMountsAndLoops()
        let remaining = Mounts.mountPoints(under: l.root)
        guard remaining.isEmpty else {
            throw LabError("could not unmount \(remaining.joined(separator: ", ")): \(problems.joined(separator: "; ")) (see `fuser -vm PATH` for what uses it), then run `quiesce lab down` again")
        }
        try FileManager.default.removeItem(atPath: l.root)
        logger.info("lab is down", metadata: ["dir": "\(l.root)"])
    }

    /// Unmounts every mount under the lab and detaches every loop device backed by a file
    /// under it, in dependency order: a filesystem goes only once no mount below it and no
    /// loop device backed by a file on it is left (the guest's loop keeps the datastore busy).
    func releaseMountsAndLoops() async -> [String] {
        let root = layout.root + "/"
        var problems: [String] = []
        var failed = Set<String>()
        for _ in 0..<100 {
            let mounts = Mounts.mountPoints(under: layout.root)
            var loops = LoopDevice.all().filter { $0.backing.hasPrefix(root) }
            if mounts.isEmpty && loops.isEmpty { break }
            var progress = false
            // Loops attached but not mounted (a crash half-way through `up`, a check's clone).
            for loop in loops where Mounts.mountPoints(of: loop.device).isEmpty {
                if (try? await LoopDevice.detach(loop.device)) != nil { progress = true }
            }
            loops = LoopDevice.all().filter { $0.backing.hasPrefix(root) }
            for mount in mounts.sorted(by: { $0.count > $1.count }) where !failed.contains(mount) {
                let hasMountsBelow = mounts.contains { $0.hasPrefix(mount + "/") }
                let backsALoop = loops.contains { $0.backing.hasPrefix(mount + "/") }
                if hasMountsBelow || backsALoop { continue }
                let source = Mounts.source(of: mount)
                do {
                    try await Mounts.unmount(mount)
                    progress = true
                } catch {
                    failed.insert(mount)
                    problems.append("\(error)")
                    continue
                }
                if let source, source.hasPrefix("/dev/loop"), LoopDevice.backingFile(of: source)?.hasPrefix(root) ?? false {
                    try? await LoopDevice.detach(source)
                }
            }
            // A detached loop device lets go of its file a moment later.
            if !progress { try? await Task.sleep(for: .milliseconds(100)) }
        }
        return problems
    }

    /// Workload processes of a `lab demo` that was killed keep the guest busy: stop them.
    /// Set in the environment of every workload process (and so of what they start) to the
    /// lab's root: how `down` finds workloads a killed `demo` left behind.
    public static let workloadMarker = "QUIESCE_LAB_WORKLOAD"

    func stopStrayWorkloads() async {
        let marker = Array("\(Self.workloadMarker)=\(layout.root)".utf8)
        let pids = Self.processes { pid, cmdline in
            if cmdline.contains("lab-workload") && cmdline.contains(layout.root + "/") { return true }
            guard let environment = KernelFile.read("/proc/\(pid)/environ") else { return false }
            return environment.split(separator: 0).contains { Array($0) == marker }
        }
        for pid in pids { kill(pid, SIGTERM) }
        for _ in 0..<50 where pids.contains(where: { kill($0, 0) == 0 }) {
            try? await Task.sleep(for: .milliseconds(100))
        }
        for pid in pids where kill(pid, 0) == 0 { kill(pid, SIGKILL) }
    }

    /// Process ids whose command line (NUL-separated arguments joined by spaces) matches.
    static func processes(matching predicate: (String) -> Bool) -> [pid_t] {
        processes { _, cmdline in predicate(cmdline) }
    }

    /// Process ids for which `predicate(pid, command line)` holds.
    static func processes(_ predicate: (pid_t, String) -> Bool) -> [pid_t] {
        let own = getpid()
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), pid != own,
                  let data = KernelFile.read("/proc/\(entry)/cmdline"), !data.isEmpty else { return nil }
            let cmdline = String(decoding: data.map { $0 == 0 ? UInt8(ascii: " ") : $0 }, as: UTF8.self)
            return predicate(pid, cmdline) ? pid : nil
        }
    }

    // MARK: status

    public struct Status: Sendable, Codable {
        public struct Part: Sendable, Codable {
            public var file: String
            public var exists: Bool
            public var loopDevices: [String]
            public var mountPoint: String
            public var mounted: Bool
        }
        public var dir: String
        public var up: Bool
        public var datastore: Part
        public var guest: Part
        public var dr: Part
        public var config: String?
        public var writers: [String]
    }

    public func status() -> Status {
        let l = layout
        let loops = LoopDevice.all()
        func part(_ file: String, _ mount: String) -> Status.Part {
            Status.Part(file: file, exists: FileManager.default.fileExists(atPath: file),
                        loopDevices: loops.filter { $0.backing == file }.map(\.device).sorted(),
                        mountPoint: mount, mounted: Mounts.isMounted(mount))
        }
        let datastore = part(l.datastoreFile, l.datastore)
        let guest = part(l.image, l.guest)
        let dr = part(l.drFile, l.dr)
        let writers = ((try? FileManager.default.contentsOfDirectory(atPath: l.writersDirectory)) ?? [])
            .filter { $0.hasSuffix(".toml") }.map { String($0.dropLast(5)) }.sorted()
        return Status(dir: l.root, up: datastore.mounted && guest.mounted && dr.mounted, datastore: datastore, guest: guest,
                      dr: dr, config: FileManager.default.fileExists(atPath: l.config) ? l.config : nil, writers: writers)
    }

    static func toolExists(_ name: String) -> Bool {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories: [String] = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        return directories.contains { (directory: String) -> Bool in access(directory + "/" + name, X_OK) == 0 }
    }
}
