/// A byte range of a volume image that differs between two snapshots, as a provider's
/// change tracking reports it. Replication reads only these ranges.
public struct ChangedRange: Sendable, Equatable, Hashable {
    public enum Kind: Sendable, Equatable, Hashable {
        /// The range holds data that differs from the base: read it from the target.
        case data
        /// The range reads as zeros in the target (a hole or an unwritten extent) but not in the base.
        case zero
        /// The provider cannot vouch for the range (unknown, encoded or delayed extents):
        /// compare it block by block against the base and send only the blocks that differ.
        case compare
    }
    public var offset: UInt64
    public var length: UInt64
    public var kind: Kind

    public init(offset: UInt64, length: UInt64, kind: Kind) {
        self.offset = offset
        self.length = length
        self.kind = kind
    }

    public var end: UInt64 { offset + length }
}

/// A provider that can say what changed between two of its snapshots of a volume
/// without reading them (block-level change tracking).
///
/// Replication calls it after a checkpoint, outside any freeze. Both snapshots are
/// committed and immutable. The cost must grow with the number of extents and the
/// changed bytes, not with the image size.
public protocol ChangeTracking: Sendable {
    /// The ranges of `target` that differ from `base`, in offset order, merged where they
    /// touch. With no base (a first replication) every range that holds data in `target`;
    /// holes are left out so that they stay holes at the receiver.
    func changedRanges(from base: String?, to target: String) throws -> [ChangedRange]
}
