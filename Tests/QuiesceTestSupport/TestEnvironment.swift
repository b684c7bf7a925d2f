import Foundation
import QuiesceSystem
import QuiesceLab

/// What the machine running the tests can do, so that tests which need root, loop
/// devices and mkfs run where they can, and *fail* (not skip) in CI when they cannot:
///
/// ```swift
/// @Test(.enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
/// func snapshotSharesExtentsWithTheImage() async throws {
///     try TestEnvironment.requireWorlds()
///     try await TestWorld.with { world in … }
/// }
/// ```
public enum TestEnvironment {
    /// Running in CI (`CI=true`): a missing prerequisite is a failure there.
    public static var isCI: Bool { ProcessInfo.processInfo.environment["CI"] == "true" }

    /// Tools a world is built with.
    static let worldTools = [
        ("losetup", "util-linux"), ("mount", "mount"), ("umount", "mount"),
        ("mkfs.xfs", "xfsprogs"), ("mkfs.ext4", "e2fsprogs"),
    ]

    /// What is missing to build a `TestWorld`, each with its fix; empty when worlds can be built.
    public static var missingForWorlds: [String] {
        var missing: [String] = []
        if geteuid() != 0 { missing.append("not running as root (loop devices, mount, FIFREEZE): run `sudo swift test`") }
        if access("/dev/loop-control", F_OK) != 0 {
            missing.append("no /dev/loop-control (load the loop module: `modprobe loop`; in a container, run it privileged)")
        }
        for (tool, package) in worldTools where locate(tool) == nil {
            missing.append("\(tool) not found (apt-get install \(package))")
        }
        return missing
    }

    /// Whether this machine can build `TestWorld`s.
    public static var canBuildWorlds: Bool { missingForWorlds.isEmpty }

    /// Throws, naming each missing prerequisite and its fix, unless worlds can be built.
    /// Call it first in every test that builds a world.
    public static func requireWorlds() throws {
        let missing = missingForWorlds
        guard missing.isEmpty else { throw TestEnvironmentError(missing: missing) }
    }

    /// The absolute path of `tool` from PATH or the sbin directories, nil if absent.
    public static func locate(_ tool: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        return directories.lazy.map { "\($0)/\(tool)" }.first { access($0, X_OK) == 0 }
    }
}

/// This machine cannot run a test that needs a world.
public struct TestEnvironmentError: Error, Sendable, CustomStringConvertible {
    public var missing: [String]
    public var description: String {
        "this test builds a world from loop devices and cannot here:\n"
            + missing.map { "  - \($0)" }.joined(separator: "\n")
    }
}

/// Runs `body` with a new empty directory `/tmp/quiesce-scratch-XXXXXX` (mode 0755, so
/// that servers running as another user can reach below it), removed afterwards even
/// when `body` throws. Refuses to remove it while something is mounted below it.
public func withTemporaryDirectory<T>(_ body: (String) throws -> T) throws -> T {
    let directory = try makeTemporaryDirectory(prefix: "quiesce-scratch")
    let result: T
    do {
        result = try body(directory)
    } catch {
        try? removeTemporaryDirectory(directory)
        throw error
    }
    try removeTemporaryDirectory(directory)
    return result
}

/// `withTemporaryDirectory` for async bodies; `body` runs in the caller's isolation.
public func withTemporaryDirectory<T>(
    isolation: isolated (any Actor)? = #isolation,
    _ body: (String) async throws -> T
) async throws -> T {
    let directory = try makeTemporaryDirectory(prefix: "quiesce-scratch")
    let result: T
    do {
        result = try await body(directory)
    } catch {
        try? removeTemporaryDirectory(directory)
        throw error
    }
    try removeTemporaryDirectory(directory)
    return result
}

/// mkdtemp under /tmp, resolved (the kernel reports mount points and loop backing
/// files by their real path), mode 0755.
func makeTemporaryDirectory(prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    guard made != nil else { throw TestSupportError("cannot create a temporary directory under /tmp: \(String(cString: strerror(errno)))") }
    let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    guard let real = realpath(path, nil) else { return path }
    defer { free(real) }
    let resolved = String(cString: real)
    chmod(resolved, 0o755)
    return resolved
}

func removeTemporaryDirectory(_ directory: String) throws {
    let mounted = Mounts.mountPoints(under: directory)
    guard mounted.isEmpty else {
        throw TestSupportError("not removing \(directory): still mounted below it: \(mounted.joined(separator: ", ")) "
                               + "(unmount what the test mounted there)")
    }
    try FileManager.default.removeItem(atPath: directory)
}

/// A fixture failed: what, and what to do.
public struct TestSupportError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
