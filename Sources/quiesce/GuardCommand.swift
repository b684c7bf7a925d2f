import ArgumentParser
import QuiesceGuard

/// The watchdog, started by the coordinator itself; not for people.
struct GuardCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guard",
        abstract: "The freeze guard (started by `quiesce checkpoint`; see docs/architecture.md).",
        shouldDisplay: false
    )

    func run() throws {
        GuardMain.run()
    }
}
