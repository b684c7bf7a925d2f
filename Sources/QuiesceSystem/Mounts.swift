import Foundation
import QuiesceCore

/// One line of /proc/self/mountinfo.
public struct MountEntry: Sendable, Equatable {
    /// Where it is mounted (octal escapes decoded).
    public var mountPoint: String
    /// What is mounted: `/dev/loop3`, `tmpfs`, …
    public var source: String
    /// `xfs`, `ext4`, …
    public var type: String
    /// The per-mount options (`rw,relatime`).
    public var options: String
    /// `major:minor` of the filesystem.
    public var device: String
}

/// Mounting, unmounting and finding mounts, from /proc/self/mountinfo.
public enum Mounts {
    static let mountTimeout: Duration = .seconds(60)
    static let unmountTimeout: Duration = .seconds(30)

    /// Mounts `device` at `path` (created if missing), e.g. `type: "ext4", options: ["ro", "noload"]`.
    public static func mount(device: String, at path: String, type: String? = nil, options: [String]? = nil) async throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        var arguments: [String] = []
        if let type { arguments += ["-t", type] }
        if let options, !options.isEmpty { arguments += ["-o", options.joined(separator: ",")] }
        arguments += [device, path]
        try await SystemCommand.run("mount", arguments, timeout: mountTimeout,
                                    hint: geteuid() == 0 ? nil : "mounting needs root: run it with sudo")
    }

    /// Unmounts `path`. A frozen filesystem is thawed first (`umount` of a frozen
    /// filesystem hangs); a busy one is retried for a few seconds before giving up.
    /// `lazily` detaches it from the tree even if busy (`umount --lazy`): the kernel
    /// finishes when the last user lets go. A last resort for teardown.
    public static func unmount(_ path: String, lazily: Bool = false) async throws {
        await thawIfFrozen(path)
        var attempt = 0
        while true {
            attempt += 1
            do {
                try await SystemCommand.run("umount", (lazily ? ["--lazy"] : []) + [path], timeout: unmountTimeout,
                                            hint: "`fuser -vm \(path)` shows what keeps it busy")
                return
            } catch let error as SystemCommandError where attempt < 25 && !error.timedOut && error.stderr.contains("busy") {
                await SystemCommand.pause(.milliseconds(200))
            }
        }
    }

    /// Whether something is mounted exactly at `path`.
    public static func isMounted(_ path: String) -> Bool {
        let target = canonical(path)
        return entries().contains { $0.mountPoint == target }
    }

    /// Mount points at or below `directory`, in mount order (parents before children).
    public static func mountPoints(under directory: String) -> [String] {
        let base = canonical(directory)
        let prefix = base == "/" ? "/" : base + "/"
        var seen = Set<String>()
        return entries().map(\.mountPoint).filter { ($0 == base || $0.hasPrefix(prefix)) && seen.insert($0).inserted }
    }

    /// Where `device` (`/dev/loop3`) is mounted.
    public static func mountPoints(of device: String) -> [String] {
        let target = canonical(device)
        return entries().filter { $0.source == device || $0.source == target }.map(\.mountPoint)
    }

    /// What is mounted at `path` (the topmost mount if several are stacked), e.g. `/dev/loop3`.
    public static func source(of path: String) -> String? {
        let target = canonical(path)
        return entries().last { $0.mountPoint == target }?.source
    }

    /// Every mount of this process's namespace.
    public static func entries() -> [MountEntry] {
        guard let text = KernelFile.text("/proc/self/mountinfo") else { return [] }
        return text.split(separator: "\n").compactMap(parse)
    }

    /// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
    static func parse(_ line: Substring) -> MountEntry? {
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 10, let dash = fields[6...].firstIndex(of: "-"), dash + 2 < fields.count else { return nil }
        return MountEntry(mountPoint: unescape(fields[4]), source: unescape(fields[dash + 2]), type: String(fields[dash + 1]),
                          options: String(fields[5]), device: String(fields[2]))
    }

    /// Decodes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
    static func unescape(_ field: Substring) -> String {
        guard field.contains("\\") else { return String(field) }
        var bytes: [UInt8] = []
        let raw = Array(field.utf8)
        var i = 0
        while i < raw.count {
            if raw[i] == UInt8(ascii: "\\"), i + 3 < raw.count {
                let digits = raw[(i + 1)...(i + 3)]
                if digits.allSatisfy({ $0 >= 48 && $0 <= 55 }) {
                    let value = digits.reduce(0) { $0 * 8 + Int($1 - 48) }
                    if value <= 255 {
                        bytes.append(UInt8(value))
                        i += 4
                        continue
                    }
                }
            }
            bytes.append(raw[i])
            i += 1
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The path as the kernel shows it (symlinks resolved), or as given if it does not exist.
    static func canonical(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else {
            var trimmed = path
            while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
            return trimmed
        }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// FITHAW until `mount` is no longer frozen. Returns whether it was frozen.
    /// Does nothing unless a filesystem is mounted exactly at `mount` (never thaws the parent's).
    @discardableResult
    public static func thaw(_ mount: String) throws -> Bool {
        guard isMounted(mount) else { return false }
        let fd = try FilesystemHold.open(mount)
        defer { close(fd) }
        var thawed = false
        for _ in 0..<8 {
            guard try FilesystemHold.thaw(fd, mount: mount) else { break }
            thawed = true
        }
        return thawed
    }
}

/// Thaws the filesystem mounted at `mount` if it is frozen (FITHAW; "not frozen" is fine).
/// For teardown after a crash: `umount` of a frozen filesystem hangs. Never throws: a
/// thaw that fails leaves the unmount that follows to report the problem.
@discardableResult
public func thawIfFrozen(_ mount: String) async -> Bool {
    (try? await runBlocking { try Mounts.thaw(mount) }) ?? false
}
