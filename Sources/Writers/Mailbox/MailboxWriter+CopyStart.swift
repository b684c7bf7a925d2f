import Foundation
import QuiesceCore

extension MailboxWriter: CopyStartable {
    /// Nothing to start (no IMAP server on a copy): reports the copy's mail root, and writes
    /// `doveadm` in `workDirectory`, a wrapper that runs Dovecot's doveadm on the copy with a
    /// private configuration (`mail_location` in the copy, its own `base_dir`, the mail user's
    /// ids from the copy, no auth service): `USER=alice <work>/doveadm mailbox status messages '*'`.
    /// Dotlocks caught by the snapshot are removed from the copy first: nothing holds locks in it.
    public func startOnCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) async throws -> RunningCopy {
        let liveRoot = marker[Self.rootKey] ?? root
        let format = marker[Self.formatKey].flatMap(MailFormat.init(rawValue:)) ?? self.format
        guard let copyRoot = copy.translate(liveRoot) else {
            throw WriterError(.nonRetryable, "\(liveRoot) is on no volume of the copy (copied mounts: \(copy.mounts.keys.sorted().joined(separator: ", ")))")
        }
        guard MailStore.isDirectory(copyRoot) else {
            throw WriterError(.nonRetryable, "the copy has no mail root at \(copyRoot)")
        }
        let removed = Self.removeDotlocks(below: copyRoot)
        let users = ((try? MailStore.entries(copyRoot)) ?? []).filter { $0.isDirectory && !$0.name.hasPrefix(".") }.map(\.name).sorted()
        var lines = ["\(format.rawValue) mail root \(copyRoot) (the copy of \(liveRoot)), users: "
                      + (users.isEmpty ? "none" : users.joined(separator: ", "))
                      + (removed > 0 ? "; removed \(removed) dotlocks caught by the snapshot" : "")]
        var state = ["root": copyRoot]
        if let doveadm = Self.doveadmCandidates.first(where: { access($0, X_OK) == 0 }) {
            let location = format == .maildir ? "maildir:\(copyRoot)/%u" : "mbox:\(copyRoot)/%u:INBOX=\(copyRoot)/%u/inbox"
            let config = workDirectory + "/dovecot.conf"
            let wrapper = workDirectory + "/doveadm"
            let base = doveadmConfig.map { "!include \($0)\n" } ?? ""
            try (base + "ssl = no\nlog_path = /dev/stderr\nmail_location = \(location)\n")
                .write(toFile: config, atomically: true, encoding: .utf8)
            try FileManager.default.createDirectory(atPath: workDirectory + "/run", withIntermediateDirectories: true)
            let script = """
                #!/bin/sh
                # doveadm on the DR test's copy of the mail store \(copyRoot) (quiesce dr test).
                : "${USER:?set USER to a mail user: USER=\(users.first ?? "alice") $0 mailbox list}"
                dir='\(copyRoot)'/"$USER"
                [ -d "$dir" ] || { echo "no mail user $USER in the copy ($dir)" >&2; exit 67; }
                HOME="$dir" exec '\(doveadm)' -c '\(config)' -o base_dir='\(workDirectory)/run' -o mail_location='\(location)' \\
                    -o mail_uid="$(stat -c %u "$dir")" -o mail_gid="$(stat -c %g "$dir")" -o first_valid_uid=0 -o first_valid_gid=0 "$@"

                """
            try script.write(toFile: wrapper, atomically: true, encoding: .utf8)
            chmod(wrapper, 0o755)
            lines.append("USER=\(users.first ?? "alice") \(wrapper) mailbox status messages '*'   (doveadm with mail_location=\(location))")
            state["doveadm"] = wrapper
        } else {
            lines.append("doveadm is not installed here (apt-get install dovecot-core): read the Maildir files directly")
        }
        return RunningCopy(writer: name, type: type, access: lines, state: state)
    }

    /// Nothing runs: nothing to stop (the wrapper goes with the test's directory).
    public func stopOnCopy(_ running: RunningCopy) async throws {}
}
