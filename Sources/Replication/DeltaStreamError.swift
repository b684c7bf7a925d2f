/// Why a delta stream, a session or a DR store refused to go on. The text names the
/// thing and, where there is one, the fix; nothing is applied after such an error.
public enum DeltaStreamError: Error, Sendable, CustomStringConvertible, Equatable {
    /// The bytes are not a delta stream, or a frame breaks the format.
    case malformed(String)
    /// A stream of a format version this quiesce does not read.
    case unsupportedVersion(Int)
    /// The stream ended early.
    case truncated(String)
    /// A frame's checksum, or the trailer's digest, does not match what arrived.
    case corrupted(String)
    /// A valid stream that does not fit this store: wrong base, older than what is there, bad names.
    case rejected(String)
    /// The pipe or connection to the peer failed.
    case transport(String)
    /// The peer made no progress for the idle timeout (a hung receiver, a silent network).
    case stalled(String)
    /// The DR store's files.
    case store(String)
    /// The peer reported an error of its own.
    case peer(String)

    public var description: String {
        switch self {
        case .malformed(let text): "malformed delta stream: \(text)"
        case .unsupportedVersion(let version):
            "delta stream format version \(version) is not supported (this quiesce reads version \(DeltaStreamHeader.currentVersion); upgrade the receiver)"
        case .truncated(let text): "delta stream truncated: \(text); the previous checkpoint is untouched, send again to resume"
        case .corrupted(let text): "delta stream corrupted: \(text); the previous checkpoint is untouched, send again to resume"
        case .rejected(let text): text
        case .transport(let text), .stalled(let text): text
        case .store(let text): "DR store: \(text)"
        case .peer(let text): "receiver: \(text)"
        }
    }
}
