import QuiesceCore

/// One line of the coordinator → guard protocol (JSON, one object per line on the guard's stdin).
/// The guard answers each `arm` and `disarm` with `ok <id>` on its stdout, and says `ready` when it starts.
struct GuardRequest: Codable {
    enum Operation: String, Codable {
        case arm
        case disarm
        /// `ids[i]` for `duties[i]`, one deadline; answered with `ok <first id>`.
        case armMany
        /// Answered with `ok <first id>`.
        case disarmMany
        /// Every duty was done by its owner: exit without running any.
        case close
    }
    var op: Operation
    var id: Int?
    /// Seconds from now until the duty's deadline (monotonic clocks are not shared between processes).
    var seconds: Double?
    var duty: GuardDuty?
    var ids: [Int]?
    var duties: [GuardDuty]?
}
