import Foundation
import CQuiesceSys
import QuiesceCore
import QuiesceSystem

/// Writable reflink clones of a checkpoint's images, attached to loop devices and mounted
/// in a private directory (0711: applications' own users, like postgres, can reach their
/// files below it, nobody can list it) on the store's filesystem. The checkpoints themselves are
/// never touched: whatever runs on the copy writes to the clones, and `release` discards them.
public struct MountedCopy: Codable, Sendable, Equatable {
    public struct Volume: Codable, Sendable, Equatable {
        public var name: String
        /// The file attached: a clone (`make`), or the image itself (`mountInPlace`).
        public var clone: String
        public var device: String?
        public var mountPoint: String?
        /// Where the volume's guest filesystem is mounted on the primary.
        public var liveMount: String?
    }

    public var directory: String
    public var volumes: [Volume]

    /// Live mount point on the primary → the copy's mount point here.
    public var layout: CopyLayout {
        var mounts: [String: String] = [:]
        for volume in volumes {
            if let live = volume.liveMount, let mountPoint = volume.mountPoint { mounts[live] = mountPoint }
        }
        return CopyLayout(mounts: mounts)
    }

    /// Clones each image into `directory` (created 0711; it must be on the images' filesystem),
    /// attaches and mounts the clones. On failure releases what it made and rethrows.
    public static func make(_ images: [(volume: String, image: String, liveMount: String?)], in directory: String) async throws -> MountedCopy {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        chmod((directory as NSString).deletingLastPathComponent, 0o711)
        chmod(directory, 0o711)
        var copy = MountedCopy(directory: directory, volumes: [])
        do {
            for item in images {
                let clone = "\(directory)/\(item.volume).img"
                try cloneFile(item.image, to: clone)
                try await copy.attachAndMount(item.volume, file: clone, liveMount: item.liveMount)
            }
        } catch {
            _ = await copy.release()
            throw error
        }
        return copy
    }

    /// Attaches and mounts the images themselves (no clone: writes go into them) below the
    /// existing `directory`; `release` unmounts, detaches and removes `directory`, never the images.
    public static func mountInPlace(_ images: [(volume: String, image: String, liveMount: String?)],
                                    in directory: String) async throws -> MountedCopy {
        var copy = MountedCopy(directory: directory, volumes: [])
        do {
            for item in images {
                try await copy.attachAndMount(item.volume, file: item.image, liveMount: item.liveMount)
            }
        } catch {
            _ = await copy.release()
            throw error
        }
        return copy
    }

    private mutating func attachAndMount(_ name: String, file: String, liveMount: String?) async throws {
        volumes.append(Volume(name: name, clone: file, device: nil, mountPoint: nil, liveMount: liveMount))
        let device = try await LoopDevice.attach(file: file)
        volumes[volumes.count - 1].device = device
        let mountPoint = "\(directory)/\(name)"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try await Self.mountCopy(device, at: mountPoint)
        volumes[volumes.count - 1].mountPoint = mountPoint
    }

    /// Unmounts, detaches and deletes the clones and the directory; returns what went wrong.
    public func release() async -> [String] {
        var problems: [String] = []
        for volume in volumes.reversed() {
            if let mountPoint = volume.mountPoint, Mounts.isMounted(mountPoint) {
                do { try await Mounts.unmount(mountPoint) } catch { problems.append("\(error)") }
            }
            if let device = volume.device {
                do { try await LoopDevice.detach(device) } catch { problems.append("\(error)") }
            }
        }
        if problems.isEmpty {
            try? FileManager.default.removeItem(atPath: directory)
        }
        return problems
    }

    /// Releases whatever is left below `directory` by a process that died holding it (a
    /// receiver killed during a verify, a crash, a power loss): kills processes still using
    /// it when asked (an application started on the copy), unmounts every mount below it
    /// (deepest first), then detaches every loop device backed by a file below it. Never
    /// detaches by a remembered device name: the kernel may have given that number to
    /// someone else since. Returns what it did and what it could not do.
    public static func releaseEverything(under directory: String, killingUsers: Bool) async -> (done: [String], problems: [String]) {
        var done: [String] = [], problems: [String] = []
        if killingUsers {
            let users = Processes.using(directory)
            for pid in users { kill(pid, SIGKILL) }
            for _ in 0..<100 where users.contains(where: Processes.isAlive) { try? await Task.sleep(for: .milliseconds(50)) }
            if !users.isEmpty { done.append("killed \(users.count) process(es) left running on \(directory): \(users.map(String.init).joined(separator: ", "))") }
        }
        for mountPoint in Mounts.mountPoints(under: directory).reversed() {
            do {
                try await Mounts.unmount(mountPoint)
                done.append("unmounted \(mountPoint)")
            } catch {
                problems.append("cannot unmount \(mountPoint): \(error) (a process still uses it? `fuser -vm \(mountPoint)`)")
            }
        }
        guard problems.isEmpty else { return (done, problems) }
        for loop in LoopDevice.all() {
            let backing = loop.backing.hasSuffix(" (deleted)") ? String(loop.backing.dropLast(10)) : loop.backing
            guard backing.hasPrefix(directory + "/") else { continue }
            do {
                try await LoopDevice.detach(loop.device)
                done.append("detached \(loop.device) and discarded the clone \(backing)")
            } catch {
                problems.append("cannot detach \(loop.device) (\(backing)): \(error)")
            }
        }
        return (done, problems)
    }

    /// Cleans up the work directories (`<prefix>…-<pid>`) below `parent` whose process is
    /// gone: what a killed verify left mounted, attached and running. Returns what it did
    /// and what it could not do (left for the next sweep).
    public static func sweepAbandoned(in parent: String, prefix: String) async -> (done: [String], problems: [String]) {
        var done: [String] = [], problems: [String] = []
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []
        for entry in entries.sorted() where entry.hasPrefix(prefix) {
            guard let dash = entry.lastIndex(of: "-"), let pid = pid_t(entry[entry.index(after: dash)...]), pid > 0,
                  !Processes.isAlive(pid) else { continue }
            let directory = "\(parent)/\(entry)"
            let (released, failed) = await releaseEverything(under: directory, killingUsers: true)
            done += released
            problems += failed
            guard failed.isEmpty else { continue }
            do {
                try FileManager.default.removeItem(atPath: directory)
                done.append("removed \(directory), left by process \(pid), which is gone")
            } catch {
                problems.append("cannot remove \(directory): \(error.localizedDescription)")
            }
        }
        return (done, problems)
    }

    static func cloneFile(_ source: String, to destination: String) throws {
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw DRError("cannot open \(source): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw DRError("cannot create \(destination): \(String(cString: strerror(errno)))") }
        defer { close(output) }
        guard quiesce_ficlone(output, input) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(destination)
            throw DRError("cannot reflink-clone \(source) (\(reason)); the DR store must be on XFS (reflink=1) or btrfs")
        }
    }

    /// XFS refuses a second mount of a filesystem with the same UUID (the clone of a
    /// checkpoint whose original is mounted too) unless told `nouuid`.
    static func mountCopy(_ device: String, at mountPoint: String) async throws {
        let probe = try? await ChildProcess.run("blkid", ["-o", "value", "-s", "TYPE", device], timeout: .seconds(10))
        let type = probe?.stdout.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        try await Mounts.mount(device: device, at: mountPoint, type: type.isEmpty ? nil : type,
                               options: type == "xfs" ? ["nouuid"] : nil)
    }
}

/// Errors of the DR side: what failed and the fix.
public struct DRError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
