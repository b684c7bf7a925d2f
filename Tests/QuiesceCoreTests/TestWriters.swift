import Foundation
import Logging
import QuiesceCore
import Synchronization

/// Everything the in-test writers and journal saw, in order.
final class EventLog: Sendable {
    private let events = Mutex<[String]>([])
    func add(_ event: String) { events.withLock { $0.append(event) } }
    var all: [String] { events.withLock { $0 } }
    func index(of event: String) -> Int? { all.firstIndex(of: event) }
}

/// A small writer that drives the state machine: each phase logs `name:phase`, and can be
/// told to veto, or to block its thread (not cooperatively) for a while.
struct ScriptedWriter: Writer {
    enum Behaviour: Sendable {
        case succeed
        case veto(String)
        /// Blocks its thread, ignoring cancellation, like a stuck C call.
        case block(Duration)
    }

    var name: String
    var type = "test"
    var order: Int
    var timeout: Duration = .seconds(5)
    var log: EventLog
    var prepareBehaviour: Behaviour = .succeed
    var freezeBehaviour: Behaviour = .succeed
    var thawBehaviour: Behaviour = .succeed
    var footprint = WriterFootprint()

    func identify() async throws -> WriterFootprint {
        log.add("\(name):identify")
        return footprint
    }

    func prepare(_ context: CheckpointContext) async throws {
        log.add("\(name):prepare")
        try await act(prepareBehaviour)
    }

    func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker {
        log.add("\(name):freeze")
        try await act(freezeBehaviour)
        return ConsistencyMarker(["writer": name])
    }

    func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws {
        log.add("\(name):thaw:\(outcome.rawValue)")
        try await act(thawBehaviour)
    }

    func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport {
        VerifyReport(ok: true, details: [])
    }

    private func act(_ behaviour: Behaviour) async throws {
        switch behaviour {
        case .succeed: return
        case .veto(let reason): throw WriterError(.retryable, reason)
        case .block(let duration):
            _ = try await runBlocking { usleep(UInt32(duration.milliseconds * 1000)) }
        }
    }
}

/// Records what the coordinator journals.
final class MemoryJournal: CheckpointJournal {
    let log: EventLog
    let finished = Mutex<CheckpointRecord?>(nil)
    init(log: EventLog) { self.log = log }

    func begin(_ record: CheckpointRecord) async throws { log.add("journal:begin") }
    func writerState(_ name: String, type: String, state: WriterState, errorKind: WriterErrorKind,
                     error: String?, checkpointID: String) async {
        log.add("state:\(name):\(state)")
    }
    func finish(_ record: CheckpointRecord) async throws {
        finished.withLock { $0 = record }
        log.add("journal:finish:\(record.outcome.rawValue)")
    }
}
