import Foundation
import QuiesceCore

/// Loop devices: a file seen as a block device (`losetup`).
public enum LoopDevice {
    static let timeout: Duration = .seconds(30)

    /// Attaches `file` to the first free loop device and returns its path (`/dev/loop3`).
    /// Parallel attaches may race for the same free device: a busy answer is retried.
    public static func attach(file: String, readOnly: Bool = false) async throws -> String {
        var arguments = ["--find", "--show"]
        if readOnly { arguments.append("--read-only") }
        arguments.append(file)
        var attempt = 0
        while true {
            attempt += 1
            do {
                let result = try await SystemCommand.run(
                    "losetup", arguments, timeout: timeout,
                    hint: geteuid() == 0 ? nil : "loop devices need root: run it with sudo")
                let device = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                guard device.hasPrefix("/dev/") else {
                    throw SystemCommandError(command: ["losetup"] + arguments, status: 0, stderr: result.stderr,
                                             hint: "losetup printed \"\(device)\" instead of a device path")
                }
                return device
            } catch let error as SystemCommandError where attempt < 5 && !error.timedOut && error.stderr.contains("busy") {
                await SystemCommand.pause(.milliseconds(50 * attempt))
            }
        }
    }

    /// Detaches `device` (`losetup --detach`). It must no longer be mounted.
    public static func detach(_ device: String) async throws {
        do {
            try await SystemCommand.run("losetup", ["--detach", device], timeout: timeout)
        } catch var error as SystemCommandError where error.stderr.contains("busy") {
            error.hint = "it is still mounted or open: `findmnt \(device)` shows where"
            throw error
        } catch let error as SystemCommandError where error.stderr.contains("No such device or address") {
            // Already detached (autoclear released it after its last unmount): nothing to do.
            _ = error
        }
    }

    /// The loop devices attached to `file` (`losetup --associated`, which compares the inode).
    public static func devices(backing file: String) async throws -> [String] {
        let result = try await SystemCommand.run("losetup", ["--noheadings", "--output", "NAME", "--associated", file],
                                                 timeout: timeout)
        return result.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// The file behind `device` (`/dev/loop3`), from /sys/block/loop3/loop/backing_file; nil if it is not attached.
    /// A backing file removed since shows with a ` (deleted)` suffix, as the kernel writes it.
    public static func backingFile(of device: String) -> String? {
        let name = (device as NSString).lastPathComponent
        guard name.hasPrefix("loop"),
              let text = KernelFile.text("/sys/block/\(name)/loop/backing_file") else { return nil }
        let path = text.hasSuffix("\n") ? String(text.dropLast()) : text
        return path.isEmpty ? nil : path
    }

    /// Every attached loop device and its backing file, from /sys/block.
    public static func all() -> [(device: String, backing: String)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted { $0.count != $1.count ? $0.count < $1.count : $0 < $1 }
            .compactMap { name in backingFile(of: "/dev/\(name)").map { (device: "/dev/\(name)", backing: $0) } }
    }
}
