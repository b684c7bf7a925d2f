import Foundation

/// Processes of this host, as `/proc` shows them.
public enum Processes {
    /// Processes whose working directory, root, or any open file lies below `directory`
    /// (what keeps a mount below it busy). Never this process.
    public static func using(_ directory: String) -> [pid_t] {
        let prefix = directory.hasSuffix("/") ? directory : directory + "/"
        func below(_ link: String) -> Bool {
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link) else { return false }
            return target == directory || target.hasPrefix(prefix)
        }
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), pid != getpid() else { return nil }
            let base = "/proc/\(entry)"
            if below(base + "/cwd") || below(base + "/root") { return pid }
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: base + "/fd")) ?? []
            return fds.contains { below("\(base)/fd/\($0)") } ? pid : nil
        }
    }

    /// Whether `pid` is a live process (a zombie counts as gone).
    public static func isAlive(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = status.lastIndex(of: ")") else { return true }
        return !status[status.index(after: close)...].hasPrefix(" Z")
    }
}
