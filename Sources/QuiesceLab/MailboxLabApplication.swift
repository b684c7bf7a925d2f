import Foundation
import QuiesceCore

/// A Dovecot Maildir store for a few users inside the lab's guest filesystem, with Dovecot's own
/// `dovecot-lda` delivering to it continuously as the workload, registered as the `mail` writer.
///
/// ```
/// <guest>/mail/<user>/           each user's Maildir (owned by nobody, who delivers)
/// <lab>/dovecot/dovecot.conf     the private Dovecot config (never in the guest: it is frozen)
/// ```
///
/// The deliveries run as `nobody` (who owns the store): as a user other than root, dovecot-lda
/// delivers to `$USER` without an auth service, so no Dovecot server is needed.
public struct MailboxLabApplication: LabApplication {
    public let name = "mailbox"
    public let requiredTools = ["doveadm"]
    public var users: [String]

    static let lda = "/usr/lib/dovecot/dovecot-lda"
    static let nobody = "65534"

    public init(users: [String] = ["alice", "bob", "carol"]) { self.users = users }

    func root(_ lab: LabLayout) -> String { "\(lab.guest)/mail" }
    func config(_ lab: LabLayout) -> String { "\(lab.root)/dovecot/dovecot.conf" }

    public func setUp(_ lab: LabLayout) async throws {
        guard access(Self.lda, X_OK) == 0 else {
            throw LabError("\(Self.lda) is missing: apt-get install -y dovecot-core (scripts/install-deps does)")
        }
        let root = root(lab)
        for user in users {
            try FileManager.default.createDirectory(atPath: "\(root)/\(user)", withIntermediateDirectories: true)
        }
        let chown = try await ChildProcess.run("chown", ["-R", "\(Self.nobody):\(Self.nobody)", root], timeout: .seconds(60))
        guard chown.succeeded else { throw LabError("chown \(root): \(chown.stderr)") }
        try FileManager.default.createDirectory(atPath: "\(lab.root)/dovecot", withIntermediateDirectories: true)
        chmod("\(lab.root)/dovecot", 0o755)
        try """
            # The lab's private Dovecot configuration (written by `quiesce lab up`).
            mail_location = maildir:\(root)/%u
            base_dir = \(lab.root)/dovecot/run
            log_path = /dev/null
            ssl = no

            """.write(toFile: config(lab), atomically: true, encoding: .utf8)
        chmod(config(lab), 0o644)
        try lab.registerWriter("mail", spec: """
            # Registered by `quiesce lab up`: the lab's Dovecot Maildir store.
            name = "mail"
            type = "mailbox"
            format = "maildir"
            root = "\(root)"
            lock_timeout = "5s"
            order = 10
            timeout = "20s"

            """)
    }

    /// One delivery loop per user: a shell loop running dovecot-lda back to back; on SIGTERM it
    /// prints how many deliveries succeeded and failed.
    public func startWorkload(_ lab: LabLayout, executable: String) throws -> [LabWorkload] {
        try users.map { user in
            let script = """
                ok=0; failed=0; n=0
                trap 'echo "$ok deliveries, $failed failed"; exit 0' TERM
                while :; do
                    n=$((n + 1))
                    if printf 'Message-ID: <%s.%s@quiesce.lab>\\nSubject: lab message %s\\n\\nlab message %s for %s\\n' \
                        "$USER" "$n" "$n" "$n" "$USER" | setpriv --reuid=\(Self.nobody) --regid=\(Self.nobody) --clear-groups \
                        \(Self.lda) -c "$CONFIG"; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
                    sleep 0.05
                done
                """
            let process = try ChildProcess("/bin/sh", ["-c", script],
                                           environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "USER": user,
                                                         "HOME": "\(root(lab))/\(user)", "CONFIG": config(lab),
                                                         Lab.workloadMarker: lab.root],
                                           stdin: .null, stdout: .pipe, stderr: .null)
            return LabWorkload(name: "dovecot-lda to \(user)", process: process)
        }
    }

    public func tearDown(_ lab: LabLayout) async {}
}
