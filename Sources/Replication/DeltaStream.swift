import Foundation
import QuiesceCore

// The delta stream, version 1. docs/delta-format.md is the reference; keep the two in step.
//
//   stream  := header frame* trailer
//   header  := "QSDELTA\0" u32le(length) json[length] xxh3_128(magic ‖ length ‖ json)
//   frame   := fixed[48] payload[fixed.payloadLength]
//   fixed   := u8 kind ‖ u8 flags ‖ u16 0 ‖ u32le payloadLength ‖ u64le sequence ‖
//              u64le offset ‖ u64le length ‖ xxh3_128(fixed[0..<32] ‖ payload)
//
// The whole-stream digest is a SHA-256 hash chain: chain₀ = SHA-256(header bytes),
// chainᵢ₊₁ = SHA-256(chainᵢ ‖ fixedᵢ). A chain value is 32 bytes, so a receiver can
// record it with its durable progress and a sender can resume from it.

/// What a stream carries, stated before any data. The receiver checks all of it before
/// it touches its store.
public struct DeltaStreamHeader: Codable, Sendable, Equatable {
    public static let currentVersion = 1
    public static let magic: [UInt8] = Array("QSDELTA".utf8) + [0]

    public var formatVersion: Int
    /// The volume's name (a file name at the receiver: no separators, no `..`).
    public var volume: String
    /// The target image's size in bytes.
    public var imageSize: UInt64
    /// The checkpoint this delta applies on; nil for a full stream (holes stay holes).
    public var base: String?
    /// The checkpoint the receiver has after applying it.
    public var target: String
    /// The largest data frame's logical length.
    public var maxFrameBytes: Int
    /// `none` or `zstd`: how data payloads may be compressed (per frame, flagged).
    public var compression: String

    public init(volume: String, imageSize: UInt64, base: String?, target: String,
                maxFrameBytes: Int = DeltaStreamHeader.defaultFrameBytes, compression: String = "none") {
        self.formatVersion = Self.currentVersion
        self.volume = volume
        self.imageSize = imageSize
        self.base = base
        self.target = target
        self.maxFrameBytes = maxFrameBytes
        self.compression = compression
    }

    public static let defaultFrameBytes = 4 << 20
    /// No stream may promise frames larger than this; a receiver buffers one frame.
    public static let frameBytesLimit = 16 << 20
    static let jsonLimit = 64 << 10

    /// The header as it goes on the wire.
    public func encoded() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let json = [UInt8](try encoder.encode(self))
        var bytes = Self.magic
        bytes.appendLittleEndian(UInt32(json.count))
        bytes += json
        let sum = Checksum128(of: bytes)
        bytes.appendLittleEndian(sum.high)
        bytes.appendLittleEndian(sum.low)
        return bytes
    }

    /// Reads and checks a header; returns it with its exact bytes (the chain's start).
    public static func read(from source: ByteSource) throws -> (DeltaStreamHeader, [UInt8]) {
        guard let prefix = try source.readExactly(12) else {
            throw DeltaStreamError.truncated("no stream header arrived (the sender sent nothing: check its error output)")
        }
        guard Array(prefix[0..<8]) == magic else {
            throw DeltaStreamError.malformed("not a quiesce delta stream (bad magic; was this produced by `quiesce send`?)")
        }
        let length = Int(prefix.littleEndianUInt32(at: 8))
        guard length <= jsonLimit else { throw DeltaStreamError.malformed("header of \(length) bytes is larger than \(jsonLimit)") }
        guard let rest = try source.readExactly(length + 16) else { throw DeltaStreamError.truncated("inside the stream header") }
        let bytes = prefix + rest
        let expected = Checksum128(of: Array(bytes[0..<12 + length]))
        let found = Checksum128(high: bytes.littleEndianUInt64(at: 12 + length), low: bytes.littleEndianUInt64(at: 20 + length))
        guard expected == found else { throw DeltaStreamError.corrupted("the stream header's checksum does not match") }
        // Read the version alone first, so a newer format gets the version error, not a decode error.
        struct Versioned: Decodable { var formatVersion: Int }
        let json = Data(bytes[12..<12 + length])
        guard let versioned = try? JSONDecoder().decode(Versioned.self, from: json) else {
            throw DeltaStreamError.malformed("the stream header is not valid JSON with a formatVersion")
        }
        guard versioned.formatVersion == currentVersion else { throw DeltaStreamError.unsupportedVersion(versioned.formatVersion) }
        let header: DeltaStreamHeader
        do { header = try JSONDecoder().decode(DeltaStreamHeader.self, from: json) } catch {
            throw DeltaStreamError.malformed("the stream header lacks a field: \(error)")
        }
        try header.validate()
        return (header, bytes)
    }

    /// Names are file names at the receiver; sizes bound what it will buffer.
    public func validate() throws {
        try Self.validateName(volume, what: "volume name")
        try Self.validateName(target, what: "target checkpoint id")
        if let base { try Self.validateName(base, what: "base checkpoint id") }
        guard maxFrameBytes > 0, maxFrameBytes <= Self.frameBytesLimit else {
            throw DeltaStreamError.malformed("frame size \(maxFrameBytes) is outside 1…\(Self.frameBytesLimit)")
        }
        guard ["none", "zstd"].contains(compression) else {
            throw DeltaStreamError.malformed("unknown compression \"\(compression)\" (this quiesce knows none and zstd)")
        }
        if let base, base >= target {
            throw DeltaStreamError.malformed("base \(base) is not older than target \(target)")
        }
    }

    static func validateName(_ name: String, what: String) throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        guard !name.isEmpty, name.count <= 128, name != ".", name != "..", !name.hasPrefix("."),
              name.allSatisfy({ allowed.contains($0) })
        else {
            throw DeltaStreamError.malformed("\(what) \"\(name)\" is not a plain name (letters, digits, . _ -; no path separators or leading dot)")
        }
    }
}

/// What a frame is.
public enum FrameKind: UInt8, Sendable {
    case data = 1
    case zero = 2
    case trailer = 3
}

/// A frame's fixed 48 bytes.
public struct FrameHeader: Sendable, Equatable {
    public static let size = 48
    public static let compressedFlag: UInt8 = 1

    public var kind: FrameKind
    public var flags: UInt8
    public var payloadLength: UInt32
    public var sequence: UInt64
    public var offset: UInt64
    public var length: UInt64
    public var checksum: Checksum128

    var isCompressed: Bool { flags & Self.compressedFlag != 0 }

    func fieldBytes() -> [UInt8] {
        var bytes: [UInt8] = [kind.rawValue, flags, 0, 0]
        bytes.reserveCapacity(Self.size)
        bytes.appendLittleEndian(payloadLength)
        bytes.appendLittleEndian(sequence)
        bytes.appendLittleEndian(offset)
        bytes.appendLittleEndian(length)
        return bytes
    }

    func encoded() -> [UInt8] {
        var bytes = fieldBytes()
        bytes.appendLittleEndian(checksum.high)
        bytes.appendLittleEndian(checksum.low)
        return bytes
    }

    static func checksum(fields: [UInt8], payload: [UInt8]) -> Checksum128 {
        Checksum128(of: fields + payload)
    }
}

/// A frame ready to send: its fixed header and payload bytes.
public struct EncodedFrame: Sendable {
    public var header: FrameHeader
    public var bytes: [UInt8]
}

/// The last frame's payload: how many frames came, the chain over them, and the
/// checkpoint's manifest (writers, markers, recovery metadata).
public struct DeltaTrailer: Codable, Sendable, Equatable {
    public var frames: UInt64
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    /// The chain value after the last frame, hex.
    public var digest: String
    public var manifest: CheckpointRecord
    /// What the DR side needs to check and start the copy: the volumes (with their guest
    /// mount points on the primary) and each writer's drop-in, as written.
    public var environment: CheckpointEnvironment?

    public init(frames: UInt64, dataBytes: UInt64, zeroBytes: UInt64, digest: String, manifest: CheckpointRecord,
                environment: CheckpointEnvironment? = nil) {
        self.frames = frames
        self.dataBytes = dataBytes
        self.zeroBytes = zeroBytes
        self.digest = digest
        self.manifest = manifest
        self.environment = environment
    }
}

/// The primary's setup that a checkpoint's writers need to be verified or started on a
/// copy elsewhere: where each volume's guest filesystem was mounted (writers' paths are
/// under those mounts) and each writer's drop-in text (no secrets: specs refuse them).
public struct CheckpointEnvironment: Codable, Sendable, Equatable {
    public struct WriterSpecText: Codable, Sendable, Equatable {
        public var name: String
        public var text: String
        public init(name: String, text: String) {
            self.name = name
            self.text = text
        }
    }
    public var volumes: [Volume]
    public var writers: [WriterSpecText]

    public init(volumes: [Volume], writers: [WriterSpecText]) {
        self.volumes = volumes
        self.writers = writers
    }
}

/// The SHA-256 hash chain over the header and every frame's fixed bytes.
public struct DigestChain: Sendable, Equatable {
    public private(set) var value: [UInt8]

    public init(headerBytes: [UInt8]) {
        var digest = SHA256Digest()
        digest.update(headerBytes)
        value = digest.finish()
    }

    /// Continue from a recorded value (a receiver's durable progress).
    public init?(hex text: String) {
        guard let bytes = bytes(fromHex: text), bytes.count == 32 else { return nil }
        value = bytes
    }

    public mutating func append(_ frame: FrameHeader) {
        var digest = SHA256Digest()
        digest.update(value)
        digest.update(frame.encoded())
        value = digest.finish()
    }

    public var hex: String { QuiesceReplication.hex(value) }
}

/// Turns delta chunks into frames: compression, checksums, sequence numbers.
public final class FrameEncoder {
    private let compressor: ZstdCompressor?

    /// `compressionLevel` nil sends data as is.
    public init(compressionLevel: Int32?) {
        compressor = compressionLevel.map { ZstdCompressor(level: $0) }
    }

    public func encode(_ chunk: DeltaChunk, sequence: UInt64) -> EncodedFrame {
        switch chunk.kind {
        case .zero:
            return frame(.zero, flags: 0, sequence: sequence, offset: chunk.offset, length: chunk.length, payload: [])
        case .data:
            let payload = chunk.payload ?? []
            if let compressed = compressor?.compress(payload) {
                return frame(.data, flags: FrameHeader.compressedFlag, sequence: sequence, offset: chunk.offset,
                             length: chunk.length, payload: compressed)
            }
            return frame(.data, flags: 0, sequence: sequence, offset: chunk.offset, length: chunk.length, payload: payload)
        }
    }

    public func trailer(_ trailer: DeltaTrailer, sequence: UInt64) throws -> EncodedFrame {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        let payload = [UInt8](try encoder.encode(trailer))
        return frame(.trailer, flags: 0, sequence: sequence, offset: 0, length: UInt64(payload.count), payload: payload)
    }

    private func frame(_ kind: FrameKind, flags: UInt8, sequence: UInt64, offset: UInt64, length: UInt64,
                       payload: [UInt8]) -> EncodedFrame {
        var header = FrameHeader(kind: kind, flags: flags, payloadLength: UInt32(payload.count), sequence: sequence,
                                 offset: offset, length: length, checksum: Checksum128(high: 0, low: 0))
        header.checksum = FrameHeader.checksum(fields: header.fieldBytes(), payload: payload)
        return EncodedFrame(header: header, bytes: header.encoded() + payload)
    }
}

/// A frame as the receiver accepts it: checked, decompressed.
public enum DecodedFrame {
    case data(FrameHeader, [UInt8])
    case zero(FrameHeader)
    case trailer(FrameHeader, DeltaTrailer)
}

/// Reads frames and checks each one against the header before anything uses it.
public final class FrameDecoder {
    private let header: DeltaStreamHeader
    private let decompressor = ZstdDecompressor()

    public init(header: DeltaStreamHeader) {
        self.header = header
    }

    /// The next frame, which must carry `sequence`.
    public func next(from source: ByteSource, sequence: UInt64) throws -> DecodedFrame {
        guard let fixed = try source.readExactly(FrameHeader.size) else {
            throw DeltaStreamError.truncated("the stream ended before frame \(sequence) (no trailer)")
        }
        guard let kind = FrameKind(rawValue: fixed[0]) else {
            throw DeltaStreamError.malformed("frame \(sequence) has unknown kind \(fixed[0])")
        }
        let flags = fixed[1]
        guard flags & ~FrameHeader.compressedFlag == 0, fixed[2] == 0, fixed[3] == 0 else {
            throw DeltaStreamError.malformed("frame \(sequence) has unknown flags")
        }
        let frame = FrameHeader(kind: kind, flags: flags, payloadLength: fixed.littleEndianUInt32(at: 4),
                                sequence: fixed.littleEndianUInt64(at: 8), offset: fixed.littleEndianUInt64(at: 16),
                                length: fixed.littleEndianUInt64(at: 24),
                                checksum: Checksum128(high: fixed.littleEndianUInt64(at: 32), low: fixed.littleEndianUInt64(at: 40)))
        guard frame.sequence == sequence else {
            throw DeltaStreamError.malformed("expected frame \(sequence), got frame \(frame.sequence) (frames lost or replayed)")
        }
        let payloadLimit = header.maxFrameBytes + header.maxFrameBytes / 8 + 1024
        guard Int(frame.payloadLength) <= payloadLimit else {
            throw DeltaStreamError.malformed("frame \(sequence) carries \(frame.payloadLength) bytes, more than the stream's frame size allows")
        }
        guard let payload = try source.readExactly(Int(frame.payloadLength)) else {
            throw DeltaStreamError.truncated("inside frame \(sequence)")
        }
        guard FrameHeader.checksum(fields: Array(fixed[0..<32]), payload: payload) == frame.checksum else {
            throw DeltaStreamError.corrupted("frame \(sequence) (offset \(frame.offset)) fails its checksum")
        }
        switch kind {
        case .data:
            try checkRange(frame)
            guard frame.length > 0, frame.length <= UInt64(header.maxFrameBytes) else {
                throw DeltaStreamError.malformed("data frame \(sequence) of \(frame.length) bytes exceeds the frame size \(header.maxFrameBytes)")
            }
            if frame.isCompressed {
                guard header.compression == "zstd",
                      let data = decompressor.decompress(payload, length: Int(frame.length))
                else { throw DeltaStreamError.corrupted("frame \(sequence) does not decompress to \(frame.length) bytes") }
                return .data(frame, data)
            }
            guard UInt64(payload.count) == frame.length else {
                throw DeltaStreamError.malformed("data frame \(sequence) says \(frame.length) bytes but carries \(payload.count)")
            }
            return .data(frame, payload)
        case .zero:
            try checkRange(frame)
            guard payload.isEmpty, !frame.isCompressed else { throw DeltaStreamError.malformed("zero frame \(sequence) carries a payload") }
            return .zero(frame)
        case .trailer:
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            do {
                return .trailer(frame, try decoder.decode(DeltaTrailer.self, from: Data(payload)))
            } catch {
                throw DeltaStreamError.malformed("the trailer is not valid: \(error)")
            }
        }
    }

    private func checkRange(_ frame: FrameHeader) throws {
        let (end, overflow) = frame.offset.addingReportingOverflow(frame.length)
        guard !overflow, end <= header.imageSize else {
            throw DeltaStreamError.malformed("frame \(frame.sequence) covers \(frame.offset)+\(frame.length), beyond the image size \(header.imageSize)")
        }
    }
}

extension Array where Element == UInt8 {
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    func littleEndianUInt32(at index: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(self[index + $1]) << (8 * UInt32($1)) }
    }

    func littleEndianUInt64(at index: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(self[index + $1]) << (8 * UInt64($1)) }
    }
}

func bytes(fromHex text: String) -> [UInt8]? {
    let characters = Array(text.utf8)
    guard characters.count % 2 == 0 else { return nil }
    var result: [UInt8] = []
    result.reserveCapacity(characters.count / 2)
    for index in stride(from: 0, to: characters.count, by: 2) {
        guard let byte = UInt8(String(decoding: characters[index..<index + 2], as: UTF8.self), radix: 16) else { return nil }
        result.append(byte)
    }
    return result
}
