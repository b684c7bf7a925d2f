import Foundation

/// Which volumes a receiver lets a sender touch (hello, stream, scrub).
public enum VolumeScope: Sendable, Equatable {
    case all
    case only(Set<String>)

    public func allows(_ volume: String) -> Bool {
        switch self {
        case .all: true
        case .only(let volumes): volumes.contains(volume)
        }
    }
}

/// `quiesce serve --allow NAME=VOLUME[,VOLUME…]`: which client, by its certificate's common
/// name, may send which volumes. A DR site that serves several primaries gives each its own
/// volumes, so one primary (or a stolen key of it) cannot overwrite another's copies.
/// Without rules every client the CA signed may send every volume.
public struct ClientAuthorization: Sendable, Equatable {
    /// Common name → volumes; nil when any client may send anything.
    public let rules: [String: VolumeScope]?

    public static let anyClient = ClientAuthorization(rules: nil)

    init(rules: [String: VolumeScope]?) { self.rules = rules }

    /// Parses `NAME=VOLUME[,VOLUME…]` rules (`NAME=*` for every volume); a name given twice
    /// adds up. Errors quote the rule and say what a rule looks like.
    public init(parsing arguments: [String]) throws {
        guard !arguments.isEmpty else { self.rules = nil; return }
        var rules: [String: VolumeScope] = [:]
        for argument in arguments {
            let shape = "expected NAME=VOLUME[,VOLUME…] (NAME: the client certificate's common name; * for every volume)"
            guard let equals = argument.firstIndex(of: "=") else {
                throw DeltaStreamError.rejected("--allow \"\(argument)\": \(shape)")
            }
            let name = String(argument[..<equals]).trimmingCharacters(in: .whitespaces)
            let list = argument[argument.index(after: equals)...].split(separator: ",", omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
            guard !name.isEmpty, !list.isEmpty, !list.contains("") else {
                throw DeltaStreamError.rejected("--allow \"\(argument)\": \(shape)")
            }
            let scope: VolumeScope
            if list == ["*"] {
                scope = .all
            } else {
                for volume in list {
                    do { try DeltaStreamHeader.validateName(volume, what: "volume name") } catch {
                        throw DeltaStreamError.rejected("--allow \"\(argument)\": \(error)")
                    }
                }
                scope = .only(Set(list))
            }
            switch (rules[name], scope) {
            case (.all?, _), (_, .all): rules[name] = .all
            case (.only(let earlier)?, .only(let more)): rules[name] = .only(earlier.union(more))
            case (nil, _): rules[name] = scope
            }
        }
        self.rules = rules
    }

    /// What the client with this certificate common name may send.
    public func scope(for commonName: String?) -> VolumeScope {
        guard let rules else { return .all }
        guard let commonName, let scope = rules[commonName] else { return .only([]) }
        return scope
    }
}
