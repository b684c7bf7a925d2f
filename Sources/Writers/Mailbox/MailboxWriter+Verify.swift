import Foundation
import QuiesceCore

extension MailboxWriter {
    /// Where Debian installs `doveadm`.
    static let doveadmCandidates = ["/usr/bin/doveadm", "/usr/local/bin/doveadm"]

    /// Checks the mail store in a copy of the snapshot set against the marker recorded at freeze:
    ///
    /// 1. every message file the marker names is in the copy's folder (`cur/` or `new/`), and no
    ///    Maildir file is shorter than the `S=<size>` in its name (not truncated);
    /// 2. Dovecot's own `doveadm force-resync '*'` runs clean for every user, with a private
    ///    configuration whose `mail_location` points at the copy (`doveadm_config`, when set, is the
    ///    base, `mail_location` is set after it; `base_dir` and the mail user are set on the command line,
    ///    and `USER` is set instead of `-u`, so no auth service and nothing live is consulted);
    /// 3. `doveadm mailbox status messages uidnext uidvalidity` of every folder the marker lists:
    ///    messages and UIDNEXT at least the marker's, UIDVALIDITY equal.
    ///
    /// doveadm writes (indexes, uidlists, moving `new/` to `cur/`): on a read-only copy it works on
    /// a private temporary copy of the store, removed afterwards. Dotlocks in the copy (quiesce's
    /// own, caught by the snapshot) are removed from the working copy first: nothing holds locks in a copy.
    public func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport {
        try await runBlocking { [self] in try verifyCopy(copy, marker: marker) }
    }

    func verifyCopy(_ copy: CopyLayout, marker: ConsistencyMarker) throws -> VerifyReport {
        var checks = VerifyChecks()
        let liveRoot = marker[Self.rootKey] ?? root
        let format = marker[Self.formatKey].flatMap(MailFormat.init(rawValue:)) ?? self.format
        guard let copyRoot = copy.translate(liveRoot) else {
            checks.fail("\(liveRoot) is on no volume of the copy (copied mounts: \(copy.mounts.keys.sorted().joined(separator: ", ")))")
            return checks.report
        }
        guard MailStore.isDirectory(copyRoot) else {
            checks.fail("the copy has no mail root at \(copyRoot)")
            return checks.report
        }
        let summary = (marker[Self.stateKey].flatMap { try? JSONDecoder().decode([String: FolderState].self, from: Data($0.utf8)) }) ?? [:]
        let names = (marker[Self.namesKey].flatMap { try? JSONDecoder().decode([String: [String]].self, from: Data($0.utf8)) }) ?? [:]
        if marker[Self.stateKey] != nil && summary.isEmpty && marker[Self.foldersKey] != "0" {
            checks.fail("the marker's \(Self.stateKey) is not readable JSON")
        }

        // 1. Files, before doveadm renames anything.
        if format == .maildir {
            var missing: [String] = []
            var truncated: [String] = []
            var checked = 0
            let folders = Set(names.keys).union(summary.keys)
            for relative in folders.sorted() {
                var present: Set<String> = []
                for sub in ["cur", "new"] {
                    let directory = copyRoot + "/" + relative + "/" + sub
                    for entry in (try? MailStore.entries(directory)) ?? [] where !entry.isDirectory && !entry.name.hasPrefix(".") {
                        present.insert(MailStore.baseName(entry.name))
                        if let size = MailStore.declaredSize(entry.name) {
                            var info = stat()
                            checked += 1
                            if stat(directory + "/" + entry.name, &info) != 0 || UInt64(info.st_size) < size {
                                truncated.append("\(relative)/\(sub)/\(entry.name) (\(info.st_size) of \(size) bytes)")
                            }
                        }
                    }
                }
                for name in names[relative] ?? [] where !present.contains(name) { missing.append("\(relative)/\(name)") }
            }
            let listed = names.values.reduce(0) { $0 + $1.count }
            if missing.isEmpty {
                checks.pass("all \(listed) message files named in the marker are in the copy")
            } else {
                checks.fail("\(missing.count) message files named in the marker are missing from the copy: "
                            + missing.prefix(5).joined(separator: ", "))
            }
            if truncated.isEmpty {
                checks.pass("no message file is shorter than its S= size (\(checked) checked)")
            } else {
                checks.fail("\(truncated.count) message files are truncated: " + truncated.prefix(5).joined(separator: ", "))
            }
        } else {
            for (relative, expected) in summary.sorted(by: { $0.key < $1.key }) {
                var info = stat()
                let path = copyRoot + "/" + relative
                if stat(path, &info) != 0 {
                    checks.fail("\(relative): the mbox is missing from the copy")
                } else if let size = expected.s, UInt64(info.st_size) < size {
                    checks.fail("\(relative): the mbox is \(info.st_size) bytes in the copy, \(size) at freeze (truncated)")
                }
            }
        }

        // 2 and 3: doveadm on a writable working copy.
        guard let doveadm = Self.doveadmCandidates.first(where: { access($0, X_OK) == 0 }) else {
            checks.fail("doveadm is not installed (apt-get install dovecot-core): cannot run force-resync on the copy")
            return checks.report
        }
        let scratch = try Self.makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        var workRoot = copyRoot
        if access(copyRoot, W_OK) != 0 || Self.isReadOnlyMount(copyRoot) {
            workRoot = scratch + "/mail"
            let result = try ChildProcess.runSync("/bin/cp", ["-a", "--reflink=auto", copyRoot, workRoot], timeout: .seconds(600))
            guard result.succeeded else {
                throw WriterError(.retryable, "cannot copy \(copyRoot) to \(workRoot) to verify it: \(result.stderr)",
                                  hint: "free space in \(FileManager.default.temporaryDirectory.path) or set TMPDIR")
            }
            checks.pass("the copy is read-only: doveadm ran on a private copy of the store")
        }
        let removedLocks = Self.removeDotlocks(below: workRoot)
        if removedLocks > 0 { checks.pass("removed \(removedLocks) dotlocks caught by the snapshot from the working copy") }

        // mail_location in the file, after the operator's config (the later setting wins; doveadm
        // ignores a `-o mail_location` for mailbox status).
        let config = scratch + "/dovecot.conf"
        let base = doveadmConfig.map { "!include \($0)\n" } ?? ""
        let location = format == .maildir ? "maildir:\(workRoot)/%u" : "mbox:\(workRoot)/%u:INBOX=\(workRoot)/%u/inbox"
        try (base + "ssl = no\nlog_path = /dev/stderr\nmail_location = \(location)\n")
            .write(toFile: config, atomically: true, encoding: .utf8)

        var byUser: [String: [(relative: String, state: FolderState)]] = [:]
        for (relative, state) in summary {
            let user = String(relative.split(separator: "/", maxSplits: 1).first ?? "")
            byUser[user, default: []].append((relative, state))
        }
        let users = Set(byUser.keys).union(((try? MailStore.entries(workRoot)) ?? []).filter { $0.isDirectory && !$0.name.hasPrefix(".") }.map(\.name))
        for user in users.sorted() {
            var info = stat()
            guard stat(workRoot + "/" + user, &info) == 0 else {
                checks.fail("user \(user): no directory \(user) in the copy")
                continue
            }
            let arguments = ["-c", config, "-o", "base_dir=\(scratch)/run",
                             "-o", "mail_uid=\(info.st_uid)", "-o", "mail_gid=\(info.st_gid)",
                             "-o", "first_valid_uid=0", "-o", "first_valid_gid=0"]
            let environment = ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "USER": user, "HOME": workRoot + "/" + user]
            let resync = try ChildProcess.runSync(doveadm, arguments + ["force-resync", "*"], environment: environment,
                                                  timeout: .seconds(300))
            let complaints = resync.stderr.split(separator: "\n").filter { $0.contains("Error:") || $0.contains("Fatal:") || $0.contains("Panic:") }
            if resync.succeeded && complaints.isEmpty {
                checks.pass("user \(user): doveadm force-resync clean")
            } else {
                checks.fail("user \(user): doveadm force-resync exited \(resync.status): "
                            + (complaints.isEmpty ? resync.stderr : complaints.prefix(3).joined(separator: "; ")))
                continue
            }
            let status = try ChildProcess.runSync(doveadm, ["-f", "tab"] + arguments + ["mailbox", "status", "messages uidnext uidvalidity", "*"],
                                                  environment: environment, timeout: .seconds(300))
            guard status.succeeded else {
                checks.fail("user \(user): doveadm mailbox status exited \(status.status): \(status.stderr)")
                continue
            }
            let found = Self.parseStatus(status.stdout)
            for (relative, expected) in (byUser[user] ?? []).sorted(by: { $0.relative < $1.relative }) {
                let folder = MailFolder(path: "", relative: relative, owner: 0, group: 0, lockMode: 0)
                let mailbox = folder.mailboxName(format)
                guard let got = found[mailbox] else {
                    checks.fail("\(relative): doveadm does not list mailbox \(mailbox) of \(user)")
                    continue
                }
                var problems: [String] = []
                if got.m < expected.m { problems.append("\(got.m) messages, \(expected.m) at freeze") }
                if got.n < expected.n { problems.append("UIDNEXT \(got.n), \(expected.n) at freeze") }
                if expected.v != 0 && got.v != expected.v { problems.append("UIDVALIDITY \(got.v), \(expected.v) at freeze") }
                if problems.isEmpty {
                    checks.pass("\(user) \(mailbox): \(got.m) messages ≥ \(expected.m), UIDNEXT \(got.n) ≥ \(expected.n)")
                } else {
                    checks.fail("\(user) \(mailbox): " + problems.joined(separator: ", "))
                }
            }
        }
        return checks.report
    }

    /// `doveadm -f tab mailbox status 'messages uidnext uidvalidity'`: a header line, then one tab-separated row per mailbox.
    static func parseStatus(_ text: String) -> [String: FolderState] {
        var lines = text.split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false).map(String.init) }
        guard let header = lines.first else { return [:] }
        lines.removeFirst()
        func column(_ name: String) -> Int? { header.firstIndex(of: name) }
        guard let mailbox = column("mailbox"), let messages = column("messages"), let next = column("uidnext") else { return [:] }
        let validity = column("uidvalidity")
        var result: [String: FolderState] = [:]
        for row in lines where row.count == header.count {
            result[row[mailbox]] = FolderState(m: Int(row[messages]) ?? 0, v: validity.flatMap { UInt32(row[$0]) } ?? 0,
                                               n: UInt32(row[next]) ?? 0)
        }
        return result
    }

    /// Removes `dovecot-uidlist.lock` and `*.lock` files below `root` (a working copy). Returns how many.
    static func removeDotlocks(below root: String) -> Int {
        var removed = 0
        func walk(_ directory: String) {
            for entry in (try? MailStore.entries(directory)) ?? [] {
                let path = directory + "/" + entry.name
                if entry.isDirectory {
                    if !["cur", "new", "tmp"].contains(entry.name) { walk(path) }
                } else if entry.name.hasSuffix(".lock"), unlink(path) == 0 {
                    removed += 1
                }
            }
        }
        walk(root)
        return removed
    }

    static func isReadOnlyMount(_ path: String) -> Bool {
        var info = statvfs()
        return statvfs(path, &info) == 0 && info.f_flag & UInt(ST_RDONLY) != 0
    }

    static func makeTemporaryDirectory() throws -> String {
        var template = Array((FileManager.default.temporaryDirectory.path + "/quiesce-mail-verify-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
            throw POSIXFailure("mkdtemp in \(FileManager.default.temporaryDirectory.path)", errno)
        }
        chmod(made, 0o755)
        return made
    }
}

