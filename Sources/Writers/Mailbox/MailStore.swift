import Foundation
import QuiesceCore

/// The two on-disk formats Dovecot keeps mail in that this writer understands.
public enum MailFormat: String, Sendable, CaseIterable {
    /// One directory per folder with `cur/`, `new/`, `tmp/` and `dovecot-uidlist`.
    case maildir
    /// One file per folder; `INBOX` is the user directory's `inbox` file.
    case mbox
}

/// One folder of a user's store: a Maildir directory, or an mbox file.
struct MailFolder: Sendable, Hashable {
    /// Absolute: the Maildir folder's directory, or the mbox file.
    var path: String
    /// Below the root: `alice`, `alice/.Sent`, `bob/inbox`, `bob/Archive/2024`.
    var relative: String
    var owner: uid_t
    var group: gid_t
    /// Mode for our lock file (the mailbox's, read-write bits only).
    var lockMode: mode_t

    var user: String { String(relative.split(separator: "/", maxSplits: 1).first ?? "") }
    /// The path below the user's directory ("" for a Maildir INBOX).
    var insideUser: String {
        let parts = relative.split(separator: "/", maxSplits: 1)
        return parts.count == 2 ? String(parts[1]) : ""
    }

    func lockPath(_ format: MailFormat) -> String {
        format == .maildir ? path + "/dovecot-uidlist.lock" : path + ".lock"
    }
    func protectedPath(_ format: MailFormat) -> String {
        format == .maildir ? path + "/dovecot-uidlist" : path
    }

    /// The name `doveadm` shows for this folder.
    func mailboxName(_ format: MailFormat) -> String {
        let inside = insideUser
        switch format {
        case .maildir:
            if inside.isEmpty { return "INBOX" }
            // Maildir++ (`.Sent`, `.Lists.quiesce`): the leading dot goes; LAYOUT=fs keeps the path.
            return inside.hasPrefix(".") ? String(inside.dropFirst()) : inside
        case .mbox:
            return inside == "inbox" ? "INBOX" : inside
        }
    }
}

/// What a folder held when it was locked: the marker's per-folder summary.
struct FolderState: Sendable, Codable, Equatable {
    /// Messages present (Maildir: files in `cur/` and `new/`; mbox: `From ` separator lines).
    var m: Int
    /// UIDVALIDITY (0 when Dovecot has not assigned one yet).
    var v: UInt32
    /// UIDNEXT: the next UID Dovecot will assign.
    var n: UInt32
    /// mbox: the file's size in bytes.
    var s: UInt64?
}

/// Reading a Dovecot store's layout and state. All blocking.
enum MailStore {
    /// Every folder below `root` (one directory per user), sorted by path.
    static func folders(root: String, format: MailFormat) throws -> [MailFolder] {
        var found: [MailFolder] = []
        for user in try entries(root) where !user.name.hasPrefix(".") && user.isDirectory {
            let userPath = root + "/" + user.name
            switch format {
            case .maildir: walkMaildir(userPath, relative: user.name, into: &found)
            case .mbox: walkMbox(userPath, relative: user.name, into: &found)
            }
        }
        return found.sorted { $0.relative < $1.relative }
    }

    struct Entry {
        var name: String
        var isDirectory: Bool
        var isRegular: Bool
    }

    /// A directory's entries, without `.` and `..`, with their types (lstat when readdir does not say).
    static func entries(_ directory: String) throws -> [Entry] {
        guard let dir = opendir(directory) else { throw POSIXFailure("open directory \(directory)", errno) }
        defer { closedir(dir) }
        var result: [Entry] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            var type = Int32(entry.pointee.d_type)
            if type == Int32(DT_UNKNOWN) {
                var info = stat()
                if lstat(directory + "/" + name, &info) == 0 {
                    type = info.st_mode & S_IFMT == S_IFDIR ? Int32(DT_DIR) : info.st_mode & S_IFMT == S_IFREG ? Int32(DT_REG) : 0
                }
            }
            result.append(Entry(name: name, isDirectory: type == Int32(DT_DIR), isRegular: type == Int32(DT_REG)))
        }
        return result
    }

    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFDIR
    }

    private static func folder(_ path: String, relative: String, lockModeFrom info: stat) -> MailFolder {
        let mode = mode_t(info.st_mode & 0o666)
        return MailFolder(path: path, relative: relative, owner: info.st_uid, group: info.st_gid,
                          lockMode: mode == 0 ? 0o600 : mode)
    }

    /// A directory with `cur/` and `new/` is a folder; its other subdirectories (Maildir++ `.Sub`
    /// folders, LAYOUT=fs children) are searched too, never `cur/`, `new/`, `tmp/` themselves.
    private static func walkMaildir(_ path: String, relative: String, into found: inout [MailFolder]) {
        guard let children = try? entries(path) else { return }
        let names = Set(children.filter(\.isDirectory).map(\.name))
        if names.contains("cur") && names.contains("new") {
            var info = stat()
            if stat(path, &info) == 0 {
                var uidlist = stat()
                let source = stat(path + "/dovecot-uidlist", &uidlist) == 0 ? uidlist : info
                var folder = folder(path, relative: relative, lockModeFrom: source)
                folder.owner = info.st_uid
                folder.group = info.st_gid
                found.append(folder)
            }
        }
        for child in children where child.isDirectory && !["cur", "new", "tmp"].contains(child.name) {
            walkMaildir(path + "/" + child.name, relative: relative + "/" + child.name, into: &found)
        }
    }

    /// Every regular file is an mbox, except Dovecot's own (`.imap/`, `.subscriptions`, `dovecot*`)
    /// and lock files; subdirectories not starting with a dot are folder hierarchies.
    private static func walkMbox(_ path: String, relative: String, into found: inout [MailFolder]) {
        guard let children = try? entries(path) else { return }
        for child in children where !child.name.hasPrefix(".") {
            let childPath = path + "/" + child.name
            if child.isDirectory {
                walkMbox(childPath, relative: relative + "/" + child.name, into: &found)
            } else if child.isRegular, !child.name.hasSuffix(".lock"), !child.name.hasPrefix("dovecot") {
                var info = stat()
                if stat(childPath, &info) == 0 { found.append(folder(childPath, relative: relative + "/" + child.name, lockModeFrom: info)) }
            }
        }
    }

    // MARK: Maildir state

    /// Message file names in `cur/` and `new/`, without the `:2,FLAGS` suffix (flag changes rename files).
    static func maildirMessages(_ folder: String) -> [String] {
        var names: [String] = []
        for sub in ["cur", "new"] {
            for entry in (try? entries(folder + "/" + sub)) ?? [] where !entry.name.hasPrefix(".") && !entry.isDirectory {
                names.append(baseName(entry.name))
            }
        }
        return names
    }

    static func baseName(_ file: String) -> String {
        file.firstIndex(of: ":").map { String(file[..<$0]) } ?? file
    }

    /// The `S=<size>` of a Dovecot Maildir file name (`1700000000.M1P2.host,S=1234,W=1260:2,S`), if any.
    static func declaredSize(_ file: String) -> UInt64? {
        let base = baseName(file)
        for part in base.split(separator: ",").dropFirst() where part.hasPrefix("S=") {
            return UInt64(part.dropFirst(2))
        }
        return nil
    }

    /// UIDVALIDITY and UIDNEXT from `dovecot-uidlist` (version 3: `3 V<validity> N<next> G<guid>`,
    /// then `<uid> [ext] :<file>` lines appended in UID order). The header's N is only rewritten
    /// with the whole file, so UIDNEXT is the larger of N and the last line's UID + 1.
    /// (0, 1) when there is no uidlist yet.
    static func uidlist(_ path: String) throws -> (validity: UInt32, next: UInt32) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return (0, 1) }
            throw POSIXFailure("open \(path)", errno)
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw POSIXFailure("fstat \(path)", errno) }
        let size = Int(info.st_size)
        var head = [UInt8](repeating: 0, count: min(size, 512))
        let h = pread(fd, &head, head.count, 0)
        guard h >= 0 else { throw POSIXFailure("read \(path)", errno) }
        let headerLine = String(decoding: head[0..<h].prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        var validity: UInt32 = 0, next: UInt32 = 1
        let fields = headerLine.split(separator: " ")
        if fields.first == "3" || fields.first == "2" || fields.first == "1" {
            for field in fields.dropFirst() {
                if field.hasPrefix("V"), let v = UInt32(field.dropFirst()) { validity = v }
                if field.hasPrefix("N"), let n = UInt32(field.dropFirst()) { next = n }
            }
            if fields.first != "3", fields.count >= 3 {
                // Versions 1 and 2: `<version> <uidvalidity> <nextuid>`.
                validity = UInt32(fields[1]) ?? validity
                next = UInt32(fields[2]) ?? next
            }
        }
        let tailLength = min(size, 4096)
        var tail = [UInt8](repeating: 0, count: tailLength)
        let t = pread(fd, &tail, tailLength, off_t(size - tailLength))
        if t > 0 {
            let lines = tail[0..<t].split(separator: UInt8(ascii: "\n"))
            if lines.count >= 1, size > headerLine.utf8.count + 1 {
                let last = String(decoding: lines[lines.count - 1], as: UTF8.self)
                if let uid = UInt32(last.prefix { $0.isNumber }), !last.hasPrefix(headerLine) {
                    next = max(next, uid &+ 1)
                }
            }
        }
        return (validity, next)
    }

    // MARK: mbox state

    /// Message count (`From ` lines at the start or after an empty line), UIDVALIDITY and UIDNEXT
    /// from the first message's `X-IMAPbase: <validity> <last uid>` and the largest `X-UID:`.
    static func mbox(_ path: String) throws -> FolderState {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw POSIXFailure("fstat \(path)", errno) }
        let size = Int(info.st_size)
        guard size > 0 else { return FolderState(m: 0, v: 0, n: 1, s: 0) }
        guard let map = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), map != MAP_FAILED else {
            throw POSIXFailure("mmap \(path)", errno)
        }
        defer { munmap(map, size) }
        let bytes = UnsafeBufferPointer(start: map.assumingMemoryBound(to: UInt8.self), count: size)
        var messages = 0
        var validity: UInt32 = 0, lastUID: UInt32 = 0, maxUID: UInt32 = 0
        var lineStart = 0
        var previousEmpty = true
        var inHeaders = false
        func number(_ from: Int, _ end: Int) -> (UInt32, Int) {
            var i = from
            while i < end && bytes[i] == UInt8(ascii: " ") { i += 1 }
            var value: UInt64 = 0
            while i < end, bytes[i] >= 48, bytes[i] <= 57 { value = value * 10 + UInt64(bytes[i] - 48); i += 1 }
            return (UInt32(truncatingIfNeeded: value), i)
        }
        func hasPrefix(_ at: Int, _ end: Int, _ text: StaticString) -> Bool {
            let count = text.utf8CodeUnitCount
            guard end - at >= count else { return false }
            let p = text.utf8Start
            for k in 0..<count where bytes[at + k] != p[k] { return false }
            return true
        }
        while lineStart < size {
            var end = lineStart
            if let found = memchr(bytes.baseAddress! + lineStart, 0x0A, size - lineStart) {
                end = lineStart + (UnsafeRawPointer(found) - UnsafeRawPointer(bytes.baseAddress! + lineStart))
            } else {
                end = size
            }
            let empty = end == lineStart
            if previousEmpty && hasPrefix(lineStart, end, "From ") {
                messages += 1
                inHeaders = true
            } else if inHeaders {
                if empty {
                    inHeaders = false
                } else if messages == 1 && hasPrefix(lineStart, end, "X-IMAPbase:") {
                    let (v, next) = number(lineStart + 11, end)
                    validity = v
                    lastUID = number(next, end).0
                } else if hasPrefix(lineStart, end, "X-UID:") {
                    maxUID = max(maxUID, number(lineStart + 6, end).0)
                }
            }
            previousEmpty = empty
            lineStart = end + 1
        }
        return FolderState(m: messages, v: validity, n: max(lastUID, maxUID) &+ 1, s: UInt64(size))
    }
}
