import CQuiesceSys
import Foundation
import QuiesceCore

/// Change tracking from the two immutable clones' extent maps: a block that the live
/// image has not rewritten since snapshot N-1 is still shared, so snapshots N-1 and N
/// map it to the same disk address. Comparing the maps (FIEMAP) finds what changed
/// without reading the images: the cost grows with the number of extents.
extension ReflinkProvider: ChangeTracking {
    /// FIEMAP flags under which an extent's address or bytes cannot be vouched for:
    /// no address yet (UNKNOWN, DELALLOC), stored transformed (ENCODED, DATA_ENCRYPTED),
    /// or packed with other data (DATA_INLINE, DATA_TAIL, NOT_ALIGNED). Such ranges are
    /// sent whole in a first replication and compared by content otherwise.
    public static let untrustedExtentFlags: UInt32 =
        QUIESCE_FIEMAP_EXTENT_UNKNOWN | QUIESCE_FIEMAP_EXTENT_DELALLOC | QUIESCE_FIEMAP_EXTENT_ENCODED
            | QUIESCE_FIEMAP_EXTENT_DATA_ENCRYPTED | QUIESCE_FIEMAP_EXTENT_NOT_ALIGNED
            | QUIESCE_FIEMAP_EXTENT_DATA_INLINE | QUIESCE_FIEMAP_EXTENT_DATA_TAIL

    /// The ranges of snapshot `target` that differ from snapshot `base` (both committed,
    /// immutable `<id>.img` files on the same datastore), or with no base every range of
    /// `target` that holds data. Reads the two extent maps, never the data.
    public func changedRanges(from base: String?, to target: String) throws -> [ChangedRange] {
        let targetInfo = try Self.snapshotInfo(target)
        let targetExtents = try Self.extentMap(target)
        guard let base else {
            return Self.changedRanges(base: nil, target: targetExtents, targetSize: UInt64(targetInfo.st_size), baseSize: nil)
        }
        let baseInfo = try Self.snapshotInfo(base)
        guard baseInfo.st_dev == targetInfo.st_dev else {
            throw ProviderError(volume: nil,
                                "cannot compare snapshot \(target) with base \(base): they are on different filesystems, "
                                    + "so their disk addresses say nothing about shared blocks",
                                hint: "the base must be an earlier snapshot of the same image, in its snapshot directory")
        }
        let baseExtents = try Self.extentMap(base)
        return Self.changedRanges(base: baseExtents, target: targetExtents,
                                  targetSize: UInt64(targetInfo.st_size), baseSize: UInt64(baseInfo.st_size))
    }

    /// The changed ranges of a file mapped as `target` (of `targetSize` bytes) relative to
    /// one mapped as `base` (of `baseSize` bytes; nil base: a first replication), both
    /// extent lists in logical order as FIEMAP reports them. Pure: O(extents).
    ///
    /// - Unchanged: both sides map a byte to the same disk address (equal physical − logical,
    ///   both known and written), or both read as zeros (hole or unwritten extent; bytes
    ///   past the base's end count as a hole, as the receiver extends its copy with zeros).
    /// - `.zero`: the target reads as zeros where the base may not (data or an untrusted
    ///   extent there): zeroing is always right and needs no read.
    /// - `.compare`: either side is untrusted (`untrustedExtentFlags`) and the target is not zeros.
    /// - `.data`: the target holds data at another address than the base, or over a base hole.
    ///
    /// Without a base every written or untrusted extent is `.data`; holes and unwritten
    /// extents are left out so that they stay holes. The SHARED flag is never consulted.
    /// Ranges are clipped to `targetSize`, sorted, and merged where same-kind ranges touch.
    public static func changedRanges(base: [Extent]?, target: [Extent], targetSize: UInt64,
                                     baseSize: UInt64?) -> [ChangedRange] {
        let targetPieces = pieces(of: target, size: targetSize)
        let basePieces = base.map { pieces(of: $0, size: baseSize ?? .max) }
        var targetCursor = Cursor(targetPieces), baseCursor = basePieces.map(Cursor.init)
        var result: [ChangedRange] = []
        var position: UInt64 = 0
        while position < targetSize {
            let (targetContent, targetBoundary) = targetCursor.content(at: position)
            var end = min(targetBoundary, targetSize)
            let kind: ChangedRange.Kind?
            if baseCursor == nil {
                kind = targetContent == .zero ? nil : .data
            } else {
                let (baseContent, baseBoundary) = baseCursor!.content(at: position)
                end = min(end, baseBoundary)
                kind = classify(target: targetContent, base: baseContent)
            }
            if let kind {
                if let last = result.last, last.kind == kind, last.end == position {
                    result[result.count - 1].length += end - position
                } else {
                    result.append(ChangedRange(offset: position, length: end - position, kind: kind))
                }
            }
            position = end
        }
        return result
    }

    // MARK: helpers

    /// What a range of a file reads as, as far as its extent map tells.
    enum Content: Equatable {
        /// A hole or an unwritten extent.
        case zero
        /// Written data at disk address logical + `delta` (constant within an extent).
        case data(delta: UInt64)
        /// An extent whose address or bytes the map cannot vouch for.
        case untrusted
    }

    struct Piece {
        var start: UInt64
        var end: UInt64
        var content: Content
    }

    private static func classify(target: Content, base: Content) -> ChangedRange.Kind? {
        switch (target, base) {
        case (.zero, .zero): nil
        case (.zero, _): .zero
        case (.untrusted, _), (_, .untrusted): .compare
        case (.data(let t), .data(let b)): t == b ? nil : .data
        case (.data, .zero): .data
        }
    }

    /// The extents as non-overlapping pieces in logical order, clipped to `size`;
    /// holes are the gaps between them.
    static func pieces(of extents: [Extent], size: UInt64) -> [Piece] {
        var pieces: [Piece] = []
        pieces.reserveCapacity(extents.count)
        let sorted = extents.indices.dropFirst().allSatisfy({ extents[$0 - 1].logical <= extents[$0].logical })
            ? extents : extents.sorted { $0.logical < $1.logical }
        var covered: UInt64 = 0
        for extent in sorted {
            let start = max(extent.logical, covered)
            let end = min(extent.logical.addingReportingOverflow(extent.length).overflow ? .max : extent.logicalEnd, size)
            guard start < end else { continue }
            let content: Content
            if extent.flags & untrustedExtentFlags != 0 {
                content = .untrusted
            } else if extent.isUnwritten {
                content = .zero
            } else {
                content = .data(delta: extent.physical &- extent.logical)
            }
            pieces.append(Piece(start: start, end: end, content: content))
            covered = end
        }
        return pieces
    }

    /// Walks pieces by increasing offset.
    struct Cursor {
        let pieces: [Piece]
        var index = 0

        init(_ pieces: [Piece]) { self.pieces = pieces }

        /// What `position` reads as and where that stops being true. Positions must not decrease.
        mutating func content(at position: UInt64) -> (Content, boundary: UInt64) {
            while index < pieces.count, pieces[index].end <= position { index += 1 }
            guard index < pieces.count else { return (.zero, .max) }
            let piece = pieces[index]
            return piece.start <= position ? (piece.content, piece.end) : (.zero, piece.start)
        }
    }

    private static func snapshotInfo(_ path: String) throws -> stat {
        var info = stat()
        guard stat(path, &info) == 0 else {
            let code = errno
            throw ProviderError(volume: nil, "cannot read the extent map of snapshot \(path): \(explain(code))",
                                hint: code == ENOENT ? "the snapshot was deleted or pruned; replicate from an existing base" : nil)
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw ProviderError(volume: nil, "snapshot \(path) is not a regular file")
        }
        return info
    }

    private static func extentMap(_ path: String) throws -> [Extent] {
        do {
            return try ExtentMap.extents(of: path)
        } catch let failure as POSIXFailure {
            throw ProviderError(volume: nil, "cannot read the extent map of snapshot \(path): \(explain(failure.code))",
                                hint: isNoReflink(failure.code)
                                    ? "this filesystem does not support FIEMAP; replicate with a full hash compare" : nil)
        }
    }
}
