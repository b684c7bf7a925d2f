import CLibCrypto
import CXXHash

/// A 128-bit XXH3 checksum: per frame of the stream and per block of a hash compare.
/// Fast (many GB/s) and strong against accidental corruption; the stream's digest
/// over all frames is SHA-256.
public struct Checksum128: Sendable, Hashable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// XXH3-128 of `bytes`.
    public init(of bytes: UnsafeRawBufferPointer) {
        let hash = XXH3_128bits(bytes.baseAddress, bytes.count)
        self.init(high: hash.high64, low: hash.low64)
    }

    public init(of bytes: [UInt8]) {
        self = bytes.withUnsafeBytes { Checksum128(of: $0) }
    }

    public var description: String { hex(high) + hex(low) }
}

/// SHA-256, incrementally.
public struct SHA256Digest: Sendable {
    private var context = SHA256_CTX()

    public init() {
        SHA256_Init(&context)
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        SHA256_Update(&context, bytes.baseAddress, bytes.count)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The digest; the context is consumed (a copy keeps going).
    public func finish() -> [UInt8] {
        var copy = context
        var out = [UInt8](repeating: 0, count: Int(SHA256_DIGEST_LENGTH))
        SHA256_Final(&out, &copy)
        return out
    }
}

func hex(_ value: UInt64) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
}

func hex(_ bytes: [UInt8]) -> String {
    bytes.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
}
