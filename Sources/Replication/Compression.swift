import CZstd

/// zstd compression of frame payloads, one independent zstd frame per stream frame
/// (so a resumed stream can start at any frame).
final class ZstdCompressor {
    private let context: OpaquePointer
    private let level: Int32
    private var output: [UInt8] = []

    init(level: Int32) {
        context = ZSTD_createCCtx()
        self.level = level
    }

    deinit { ZSTD_freeCCtx(context) }

    /// The compressed bytes, or nil when compressing does not make the payload smaller.
    func compress(_ input: [UInt8]) -> [UInt8]? {
        let bound = ZSTD_compressBound(input.count)
        if output.count < bound { output = [UInt8](repeating: 0, count: bound) }
        let size = input.withUnsafeBytes { source in
            output.withUnsafeMutableBytes { destination in
                ZSTD_compressCCtx(context, destination.baseAddress, bound, source.baseAddress, source.count, level)
            }
        }
        guard ZSTD_isError(size) == 0, size < input.count else { return nil }
        return Array(output[0..<size])
    }
}

final class ZstdDecompressor {
    private let context: OpaquePointer

    init() { context = ZSTD_createDCtx() }
    deinit { ZSTD_freeDCtx(context) }

    /// Exactly `length` bytes, or nil when the payload is not a zstd frame of that size.
    func decompress(_ input: [UInt8], length: Int) -> [UInt8]? {
        var output = [UInt8](repeating: 0, count: length)
        let size = input.withUnsafeBytes { source in
            output.withUnsafeMutableBytes { destination in
                ZSTD_decompressDCtx(context, destination.baseAddress, length, source.baseAddress, source.count)
            }
        }
        guard ZSTD_isError(size) == 0, size == length else { return nil }
        return output
    }
}
